"""A later checkpoint of the same run (model.next_checkpoint): the step the trainer really took, Δθ_real = θ′ − θ,
to hold the predicted step and δH₁ against (docs/math.md "Against the trainer's next checkpoint").

Only the trainable parameters' weights are read (by the keys vectors.weight_key gives), straight from the
weights file: no second model is built.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from probe_lightning.checkpoints import LoadedCheckpoint, trainer_global_step
from probe_lightning.config import ProbeConfigError, require
from probe_lightning.optimizer_state import load_torch_file

# config.json / adapter_config.json entries that say nothing about the model's shape or layout
_VOLATILE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "inference_mode", "revision"}
LEAST_ALIGNED = 5  # tensors listed by lowest cos(Δθ_pred, Δθ_real)


@dataclass
class NextCheckpoint:
    path: str
    global_step: int
    steps: int  # k: optimizer steps from the probed checkpoint to this one
    weights: list[torch.Tensor]  # θ′, aligned with the trainable parameters


def _format(path: Path) -> str | None:
    if path.is_file() and path.suffix == ".ckpt":
        return "lightning"
    if (path / "adapter_config.json").is_file():
        return "hf_lora"
    if (path / "config.json").is_file():
        return "hf_full"
    return None


def load_next_checkpoint(
    path: str, checkpoint_path: str, checkpoint: LoadedCheckpoint, named_params, keys: list[str]
) -> NextCheckpoint:
    """θ′ of the trainable parameters from `path`, checked to be a later checkpoint of the same model and layout."""
    folder, flag = Path(path), f"model.next_checkpoint {path!r}"
    found = _format(folder)
    require(
        found is not None,
        f"{flag} is not a checkpoint (no config.json, adapter_config.json or .ckpt file): pass a later "
        f"checkpoint-M/ folder of the run that wrote model.checkpoint",
    )
    require(
        found == checkpoint.format,
        f"{flag} is a {found} checkpoint and model.checkpoint {checkpoint_path!r} a {checkpoint.format} one: "
        "pass a later checkpoint of the same run",
    )
    if found != "lightning":
        config = "adapter_config.json" if found == "hf_lora" else "config.json"
        _same_config(folder / config, Path(checkpoint_path) / config, flag, checkpoint_path)
    stored, global_step = _read_weights(folder, found, flag, keys)
    require(
        global_step is not None and checkpoint.global_step is not None,
        f"{flag}: cannot count the steps between the checkpoints: global_step is {global_step} there and "
        f"{checkpoint.global_step} in model.checkpoint {checkpoint_path!r} (HF: trainer_state.json)",
    )
    require(
        global_step > checkpoint.global_step,
        f"{flag} is at global_step {global_step}, not after model.checkpoint's {checkpoint.global_step}: "
        "pass a later checkpoint of the same run",
    )
    weights = []
    for key, (_, param) in zip(keys, named_params, strict=True):
        weight = stored.get(key)
        require(
            weight is not None,
            f"{flag} has no weight {key!r}, which model.checkpoint {checkpoint_path!r} trains: another model "
            "or adapter layout",
        )
        require(
            weight.shape == param.shape,
            f"{flag} stores {key!r} with shape {list(weight.shape)}, model.checkpoint {checkpoint_path!r} with "
            f"{list(param.shape)}: another model",
        )
        weights.append(weight.to(device=param.device, dtype=param.dtype))
    return NextCheckpoint(path, global_step, global_step - checkpoint.global_step, weights)


def _same_config(next_file: Path, this_file: Path, flag: str, checkpoint_path: str) -> None:
    there, here = (json.loads(f.read_text()) if f.is_file() else {} for f in (next_file, this_file))
    for key in sorted((set(there) | set(here)) - _VOLATILE):
        if there.get(key) != here.get(key):
            raise ProbeConfigError(
                f"{flag} is another model: its {next_file.name} has {key}={there.get(key)!r}, model.checkpoint "
                f"{checkpoint_path!r} has {key}={here.get(key)!r}"
            )


def _read_weights(folder: Path, found: str, flag: str, keys: list[str]) -> tuple[dict[str, torch.Tensor], int | None]:
    """({key: tensor} of the `keys` the checkpoint stores, global_step), each weights file opened once and only
    the tensors asked for read."""
    if found == "lightning":
        saved = load_torch_file(folder, flag, "pass a later checkpoint of the same run")
        state = saved.get("state_dict", {})
        return {key: state[key] for key in keys if key in state}, saved.get("global_step")
    if found == "hf_lora":
        files = {key: "adapter_model.safetensors" for key in keys}
    elif (folder / "model.safetensors.index.json").is_file():
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        files = {key: weight_map[key] for key in keys if key in weight_map}
    else:
        files = {key: "model.safetensors" for key in keys}
    missing = sorted({name for name in files.values() if not (folder / name).is_file()})
    require(not missing, f"{flag} lacks its weights file {missing}: only safetensors checkpoints are read")
    stored = {}
    for name in sorted(set(files.values())):
        with safe_open(str(folder / name), framework="pt") as weights:
            present = set(weights.keys())
            stored.update({key: weights.get_tensor(key) for key, f in files.items() if f == name and key in present})
    return stored, trainer_global_step(folder, flag)


def step_agreement(keys: list[str], predicted: list[torch.Tensor], real: list[torch.Tensor]) -> dict:
    """cos(Δθ_pred, Δθ_real) and ‖Δθ_pred‖/‖Δθ_real‖ overall and for the least aligned tensors (float64)."""
    rows, dot_sum, pred_sq, real_sq = [], 0.0, 0.0, 0.0
    for key, p, r in zip(keys, predicted, real, strict=True):
        p, r = p.double().flatten(), r.double().flatten()
        dot, p_norm, r_norm = torch.dot(p, r).item(), p.norm().item(), r.norm().item()
        dot_sum, pred_sq, real_sq = dot_sum + dot, pred_sq + p_norm**2, real_sq + r_norm**2
        if p_norm > 0 and r_norm > 0:
            rows.append({"name": key, "cosine": dot / (p_norm * r_norm), "norm_ratio": p_norm / r_norm})
    both = math.sqrt(pred_sq * real_sq)
    return {
        "cosine": dot_sum / both if both > 0 else float("nan"),
        "norm_ratio": math.sqrt(pred_sq / real_sq) if real_sq > 0 else float("nan"),
        "least_aligned": sorted(rows, key=lambda row: row["cosine"])[:LEAST_ALIGNED],
    }
