"""The probe's vectors by the names a checkpoint stores them under, and where in the network δH₁ comes from.

NAME, for each trainable parameter: the key of the checkpoint's weights file (model.safetensors for full
fine-tuning, adapter_model.safetensors for LoRA, which PEFT writes without the adapter's name, a Lightning
.ckpt's state_dict key), or the model's state_dict key without a checkpoint. So two checkpoints subtracted
key by key line up with `update/NAME` of vectors_probe{k}.safetensors.

δH₁ = Σ_k ⟨X̄_k, Δθ_k⟩ over parameter tensors k, Δθ the predicted step (docs/math.md); each tensor's term is
its share, and the blocks (embeddings, each decoder layer, final norm, output head) add their tensors' shares.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from probe_lightning.estimators import dot64, plugin_standard_error

# The decoder layer a parameter belongs to: "model.layers.3.", "transformer.h.3.", "encoder.block.3." ...
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EMBEDDING = re.compile(r"embed|wte|wpe")
_HEAD = re.compile(r"lm_head|output_layer|embed_out")


def weight_key(name: str, checkpoint_format: str | None, prefix: str = "") -> str:
    """Where the checkpoint's weights file keeps parameter `name` (named_parameters' name)."""
    if checkpoint_format == "hf_lora":  # PEFT's get_peft_model_state_dict drops the adapter's name
        return name.replace(".default.", ".")
    return prefix + name


def block_of(key: str) -> str:
    """embeddings, "layer i", final norm, output head, or other."""
    layer = _LAYER.search(key)
    if layer:
        return f"layer {int(layer.group(1))}"
    if _HEAD.search(key):
        return "output head"
    if _EMBEDDING.search(key):
        return "embeddings"
    if "norm" in key or "ln_f" in key:
        return "final norm"
    return "other"


def parameter_shares(keys: list[str], x_bar: list[torch.Tensor], update: list[torch.Tensor]) -> dict[str, float]:
    """⟨X̄_k, Δθ_k⟩ per parameter tensor (float64); they add up to δH₁."""
    return {key: dot64(x, u) for key, x, u in zip(keys, x_bar, update, strict=True)}


def block_shares(shares: dict[str, float]) -> dict[str, float]:
    """The parameter shares summed per block, blocks in network order (embeddings, layers, final norm, head)."""
    blocks: dict[str, float] = {}
    for key, share in shares.items():
        block = block_of(key)
        blocks[block] = blocks.get(block, 0.0) + share
    order = {"embeddings": (0, 0), "final norm": (2, 0), "output head": (3, 0), "other": (4, 0)}
    return dict(sorted(blocks.items(), key=lambda item: order.get(item[0]) or (1, int(item[0].split()[1]))))


def share_standard_errors(
    keys: list[str], entropy_terms: torch.Tensor, update_terms: torch.Tensor, scale: float
) -> tuple[dict[str, float], dict[str, float]]:
    """The plug-in SE of each parameter tensor's and each block's share (docs/math.md §9), from entropy_terms
    [B_E, tensors] (⟨X(e)_k, Ȳ_k⟩) and update_terms [B_U, tensors] (b_u's terms ⟨v_k, ∇J(p_u)_k⟩): δH₁'s plug-in
    with a_e and b_u restricted to the tensor, or to the block's tensors."""
    blocks: dict[str, list[int]] = {}
    for k, key in enumerate(keys):
        blocks.setdefault(block_of(key), []).append(k)
    parameters = {
        key: plugin_standard_error(entropy_terms[:, k], update_terms[:, k], scale) for k, key in enumerate(keys)
    }
    return parameters, {
        block: plugin_standard_error(entropy_terms[:, ks].sum(1), update_terms[:, ks].sum(1), scale)
        for block, ks in blocks.items()
    }


def save_vectors(
    path: Path, keys: list[str], x_bar: list[torch.Tensor], grad_loss: list[torch.Tensor], update: list[torch.Tensor]
) -> None:
    """x_bar/NAME, grad_loss/NAME and update/NAME into one safetensors file, written atomically."""
    tensors = {}
    for prefix, vectors in (("x_bar", x_bar), ("grad_loss", grad_loss), ("update", update)):
        tensors.update({f"{prefix}/{key}": v.detach().cpu().contiguous() for key, v in zip(keys, vectors, strict=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
