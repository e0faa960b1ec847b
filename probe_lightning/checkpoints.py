"""Load a fine-tuning checkpoint for the probe: the model as trained, its tokenizer and its Adam state.

Formats (`LoadedCheckpoint.format`):
- "hf_full": an HF Trainer / TRL `checkpoint-N/` folder with a full model (config.json + weights).
- "hf_lora": the same with a PEFT adapter (adapter_config.json + adapter weights) over a base model.
- "lightning": a Lightning `.ckpt` file (state_dict + optimizer_states) of a LightningModule that
  wraps an HF causal LM (the architecture and tokenizer come from `base_model`).

Which parameter each optimizer entry belongs to. HF Trainer.create_optimizer builds two groups over
the requires_grad parameters, each in named_parameters() order: group 0 those with weight decay,
group 1 those without (biases, norm weights: `hf_trainer_layout`). So for full fine-tuning the
optimizer order is not model order (every norm weight comes last); for LoRA it usually is. A
LightningModule's optimizer is assumed to get its parameters in module order (`self.parameters()`,
all or only the requires_grad ones), unless it saved their names (param_names). Every candidate
order is checked against the saved group sizes and shapes; see preconditioning.adam_states_from_state_dict.

The learning rate. Both trainers step the scheduler right after the optimizer and save later, so the
saved param-group lr (= scheduler.pt's _last_lr) is the rate the *next* step would use; HF's logged
learning_rate in trainer_state.json is the rate of the step just taken, and only every logging_steps.
Lightning schedulers with interval "epoch" step only at epoch ends. Not modelled: gradient clipping
(HF max_grad_norm, default 1.0) and gradient accumulation, which act on the gradient before AdamW.
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from probe_lightning.config import ProbeConfigError, require
from probe_lightning.models import load_model_and_tokenizer, load_tokenizer, unreadable_weights
from probe_lightning.optimizer_state import OptimizerState, load_torch_file, next_learning_rate
from probe_lightning.preconditioning import (
    NamedParams,
    ParamLayout,
    adam_states_from_state_dict,
    sequential_layout,
)

log = logging.getLogger(__name__)

FORMATS = ("hf_full", "hf_lora", "lightning")
# transformers 5.x Trainer.get_decay_parameter_names: no weight decay inside nn.LayerNorm modules or
# for names (lowercased) matching any of these.
_HF_NO_DECAY_PATTERNS = [
    re.compile(pattern) for pattern in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_CHECKPOINT_FIX = "re-save the checkpoint or point model.checkpoint at another one"


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready for the probe; optimizer.adam_states align with trainable_parameters(model)."""

    model: nn.Module  # the full model, or a PeftModel with only the adapter trainable; eval mode, on CPU
    tokenizer: PreTrainedTokenizerBase
    format: str  # one of FORMATS
    optimizer: OptimizerState  # adam_states None when require_optimizer_state=False
    global_step: int | None  # optimizer steps taken in training, as the trainer recorded them
    weight_prefix: str = ""  # a Lightning .ckpt's state_dict prefix of the model's weights ("model.")


def trainable_parameters(model: nn.Module) -> NamedParams:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def load_checkpoint(
    path: str,
    base_model: str | None = None,
    require_optimizer_state: bool = True,
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Load an HF Trainer/TRL checkpoint-N/ folder or a Lightning .ckpt file (see the module docstring).

    Args:
        path: the checkpoint folder or file.
        base_model: the model a LoRA adapter or Lightning checkpoint was trained from (alias, local
            folder or cached HF id); for LoRA it defaults to adapter_config.json's base_model_name_or_path.
            Also the tokenizer's source when the checkpoint has no tokenizer files.
        require_optimizer_state: False (model.update: identity) loads no Adam state and lets a
            checkpoint without one through; the learning rate is still read from its param groups.
    """
    checkpoint = Path(path)
    if checkpoint.is_dir():
        return _load_hf(checkpoint, base_model, require_optimizer_state, dtype)
    if checkpoint.is_file() and checkpoint.suffix == ".ckpt":
        return _load_lightning(checkpoint, base_model, require_optimizer_state, dtype)
    raise ProbeConfigError(
        f"checkpoint {path!r} is neither a folder (HF Trainer/TRL checkpoint-N/) nor a Lightning .ckpt file"
    )


def hf_trainer_layout(model: nn.Module) -> ParamLayout:
    """HF Trainer's param groups: [with weight decay, without], requires_grad parameters in model order."""
    no_decay = {n for n, _ in model.named_parameters() if any(p.search(n.lower()) for p in _HF_NO_DECAY_PATTERNS)}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            no_decay.update(n for n, _ in module.named_parameters(prefix=module_name))
    params = trainable_parameters(model)
    return [[(n, p) for n, p in params if n not in no_decay], [(n, p) for n, p in params if n in no_decay]]


def _candidate_layouts(model: nn.Module, state_dict: dict) -> dict[str, ParamLayout]:
    """Orders a trainer may have handed the parameters to its optimizer in, most likely first."""
    layouts = {
        "HF Trainer groups (weight decay, then no weight decay)": hf_trainer_layout(model),
        "model order": sequential_layout(trainable_parameters(model), state_dict),
    }
    all_params = list(model.named_parameters())
    if len(all_params) != len(layouts["model order"]):
        layouts["model order, frozen parameters included"] = sequential_layout(all_params, state_dict)
    return layouts


# ---- HF Trainer / TRL ----


def _load_hf(folder: Path, base_model: str | None, require_optimizer_state: bool, dtype) -> LoadedCheckpoint:
    source = f"checkpoint {str(folder)!r}"
    if (folder / "adapter_config.json").is_file():
        model, base_tokenizer = _load_lora(folder, base_model, dtype, source)
        checkpoint_format = "hf_lora"
    elif (folder / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
        except SafetensorError as err:
            raise unreadable_weights(source, folder, err, _CHECKPOINT_FIX) from err
        base_tokenizer = None
        checkpoint_format = "hf_full"
    else:
        inner = sorted((p.name for p in folder.glob("checkpoint-*") if p.is_dir()), key=_checkpoint_number)
        hint = f"a Trainer output_dir: pass one of its checkpoints {inner}" if inner else "not a model checkpoint"
        raise ProbeConfigError(f"{source} has neither config.json nor adapter_config.json: {hint}")
    tokenizer = _tokenizer(folder, base_model, base_tokenizer, source)
    state_dict = None
    if (folder / "optimizer.pt").is_file():
        state_dict = load_torch_file(folder / "optimizer.pt", f"{source} optimizer.pt", _CHECKPOINT_FIX)
    elif require_optimizer_state:
        found = sorted(p.name for p in folder.iterdir())
        raise ProbeConfigError(
            f"{source} has no optimizer.pt (it holds {found}): the Adam preconditioner needs the optimizer state: "
            "pass a Trainer checkpoint-N/ saved without save_only_model, or set model.update: identity (P = 1)"
        )
    global_step = trainer_global_step(folder, source)
    return _finish(
        model, tokenizer, checkpoint_format, state_dict, f"{source} optimizer.pt", require_optimizer_state, global_step
    )


def _load_lora(folder: Path, base_model: str | None, dtype, source: str):
    try:
        from peft import PeftModel  # only LoRA checkpoints need peft
    except ImportError as err:
        raise ProbeConfigError(f"{source} is a PEFT adapter: `pip install peft` to load it") from err
    adapter_config = _read_json(folder / "adapter_config.json", source)
    base = base_model or adapter_config.get("base_model_name_or_path")
    require(base, f"{source}: adapter_config.json names no base_model_name_or_path: pass base_model")
    model, tokenizer = _load_base(base, dtype, source)
    try:
        model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    except SafetensorError as err:
        raise unreadable_weights(source, folder, err, _CHECKPOINT_FIX) from err
    return model.eval(), tokenizer


def _load_base(base: str, dtype, source: str):
    try:
        return load_model_and_tokenizer(base, dtype=dtype)
    except FileNotFoundError as err:
        raise ProbeConfigError(f"{source}: cannot load base model {base!r}: {err}") from err


def _tokenizer(folder: Path, base_model: str | None, base_tokenizer, source: str) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer files win; else the base model's."""
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return load_tokenizer(str(folder))
    if base_tokenizer is not None:
        return base_tokenizer
    require(base_model, f"{source} has no tokenizer files: pass base_model (the model it was fine-tuned from)")
    return load_tokenizer(base_model)


def trainer_global_step(folder: Path, source: str) -> int | None:
    """The optimizer steps an HF Trainer checkpoint folder had taken (trainer_state.json), None without the file."""
    trainer_state = folder / "trainer_state.json"
    return _read_json(trainer_state, source).get("global_step") if trainer_state.is_file() else None


def _read_json(file: Path, source: str) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ProbeConfigError(
            f"{source} {file.name} is truncated or corrupt, not valid JSON ({err.msg}: line {err.lineno} "
            f"column {err.colno}): {_CHECKPOINT_FIX}"
        ) from err


def _checkpoint_number(name: str) -> int:
    suffix = name.removeprefix("checkpoint-")
    return int(suffix) if suffix.isdigit() else -1


# ---- Lightning ----


def _load_lightning(path: Path, base_model: str | None, require_optimizer_state: bool, dtype) -> LoadedCheckpoint:
    source = f"checkpoint {str(path)!r}"
    checkpoint = load_torch_file(path, source, _CHECKPOINT_FIX)
    require("state_dict" in checkpoint, f"{source} has no state_dict: not a Lightning checkpoint")
    weights = checkpoint["state_dict"]
    require(
        not any(".lora_" in key for key in weights),
        f"{source} holds LoRA weights, which the probe reads only as a PEFT adapter folder: "
        "save the adapter with save_pretrained and pass that folder",
    )
    require(base_model, f"{source} is a Lightning checkpoint: pass base_model (the HF model the LightningModule wraps)")
    model, tokenizer = _load_base(base_model, dtype, source)
    prefix = _wrapped_model_prefix(weights, model, source)
    try:
        model.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
    except RuntimeError as err:
        first_error = str(err).strip().splitlines()[1:2] or [str(err)]  # line 0 is a header
        raise ProbeConfigError(f"{source} does not fit base model {base_model!r}: {first_error[0].strip()}") from err
    model.eval()
    optimizer_states = checkpoint.get("optimizer_states") or []
    require(
        len(optimizer_states) <= 1,
        f"{source} has {len(optimizer_states)} optimizers: the probe reads a LightningModule with one optimizer",
    )
    state_dict = optimizer_states[0] if optimizer_states else None
    require(
        state_dict is not None or not require_optimizer_state,
        f"{source} has no optimizer_states (saved with weights_only=True?): the Adam preconditioner needs them: "
        "save with trainer.save_checkpoint(path), or set model.update: identity (P = 1)",
    )
    return _finish(
        model,
        tokenizer,
        "lightning",
        state_dict,
        f"{source} optimizer_states[0]",
        require_optimizer_state,
        checkpoint.get("global_step"),
        name_prefix=prefix,
    )


def _wrapped_model_prefix(weights: dict, model: nn.Module, source: str) -> str:
    """The attribute path under which the LightningModule holds `model` ("model." for self.model)."""
    keys = list(model.state_dict())
    first = keys[0]
    prefixes = {key.removesuffix(first) for key in weights if key == first or key.endswith("." + first)}
    fitting = sorted(p for p in prefixes if all(p + k in weights for k in keys))
    require(
        bool(fitting),
        f"{source}: no part of its state_dict has every weight of the base model (first: {first}): "
        "is base_model the model the LightningModule wraps?",
    )
    require(
        len(fitting) == 1,
        f"{source}: its state_dict holds the base model's weights under several prefixes {fitting}: "
        "the probe reads a LightningModule that wraps one copy of the model",
    )
    return fitting[0]


# ---- both ----


def _finish(
    model, tokenizer, checkpoint_format, state_dict, source, require_optimizer_state, global_step, name_prefix=""
) -> LoadedCheckpoint:
    """Match the optimizer state (when wanted) and read the next step's learning rate."""
    adam_states = None
    if state_dict is not None and require_optimizer_state:
        layouts = _candidate_layouts(model, state_dict)
        adam_states = adam_states_from_state_dict(
            state_dict, trainable_parameters(model), source, layouts=layouts, name_prefix=name_prefix
        )
    learning_rate, learning_rate_source = next_learning_rate(state_dict, source)
    return LoadedCheckpoint(
        model=model,
        tokenizer=tokenizer,
        format=checkpoint_format,
        optimizer=OptimizerState(adam_states, learning_rate, learning_rate_source),
        global_step=global_step,
        weight_prefix=name_prefix,
    )
