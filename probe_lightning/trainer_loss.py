"""The step the user's trainer really takes: TRL GRPOTrainer's advantages, loss and clipping (docs/math.md,
"Which step: the trainer's own loss"). Plain functions on tensors; no model, no Lightning, no TRL import.

Shapes: B prompts, G completions each, R response positions; response_mask [B, G, R] is 1 on the tokens
the loss counts. "The step" is one optimizer step on one generation batch: in TRL, with the default
steps_per_generation = gradient_accumulation_steps, the N_seq = B·G completions of all processes and all
accumulated microbatches. The probe's U batch plays that role: B = B_U.

Convention. `token_coefficients` returns detached c [B, G, R] such that, on-policy (ratio = 1, where the
clipped surrogate's gradient is the plain one),

    ∇ Σ_{p,g,t} c_{p,g,t} log q(y_{p,g,t}) = −∇L_TRL = ∇J̄      (Ȳ before the geometry P ⊙ and clipping)

The probe sums per-prompt pieces and divides by B_U (Ȳ = P ⊙ Σ_p ∇J(p) / B_U), so its per-prompt piece is
∇J(p) = B_U · Σ_{g,t} c_{p,g,t} ∇log q(y_{p,g,t}).

TRL's log q is log softmax(z/τ) with its temperature τ but without top-p/top-k truncation, even when it
samples with them. With steps_per_generation ≠ gradient_accumulation_steps, or num_iterations > 1, one
generation batch feeds several optimizer steps and all but the first are off-policy: not modelled here.
"""

from dataclasses import dataclass
from typing import get_args

import torch

from probe_lightning.config import LossType, ScaleRewards, require

STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


@dataclass
class TrainerSettings:
    """The user's GRPOTrainer settings that shape its step, with TRL's names and TRL 1.16's GRPOConfig defaults.

    loss_type "seed" is the seed probe's own loss (A_g / L_max(p), docs/math.md), not a TRL one. The learning
    rate is not here: η comes from the optimizer state's param groups (optimizer_state.py) or model.learning_rate.
    """

    loss_type: LossType = "dapo"
    scale_rewards: ScaleRewards = "group"
    max_completion_length: int | None = 512
    num_generations: int | None = 8
    max_grad_norm: float | None = 1.0  # None: no clipping (HF Trainer clips only when max_grad_norm > 0)
    beta: float = 0.0

    def __post_init__(self):
        require(
            self.loss_type in get_args(LossType),
            f"trainer loss_type={self.loss_type!r} is not modelled by the probe; use one of {get_args(LossType)}",
        )
        require(
            self.scale_rewards in get_args(ScaleRewards),
            f"trainer scale_rewards={self.scale_rewards!r} must be one of {get_args(ScaleRewards)}",
        )
        require(
            self.beta == 0.0,
            f"trainer beta={self.beta}: the KL term to a reference model is not modelled; the probe needs beta=0",
        )
        require(
            self.loss_type != "dr_grpo" or (self.max_completion_length or 0) >= 1,
            f"trainer loss_type='dr_grpo' needs max_completion_length >= 1, got {self.max_completion_length}",
        )


def advantages(rewards: torch.Tensor, scale_rewards: ScaleRewards) -> torch.Tensor:
    """TRL's A_g = (r_g − mean_group r) / (std + 1e-4), [B, G] -> [B, G]; std is Bessel-corrected (TRL's nanstd).

    none: no division; group: std over the prompt's G rewards; batch: std over all B·G rewards (still the
    group mean). For "batch", rewards must be the whole generation batch (TRL gathers all processes first).
    A NaN reward (no reward function scored the response) is left out of the mean and std, and its advantage
    is 0, as TRL's: nanmean, nanstd, then NaN -> 0.
    """
    centred = rewards - rewards.nanmean(dim=1, keepdim=True)
    if scale_rewards == "none" or rewards.shape[1] == 1:  # one response: A = 0, and its std is undefined
        scaled = centred
    elif scale_rewards == "group":
        scaled = centred / (nanstd(rewards, dim=1) + STD_EPS)
    elif scale_rewards == "batch":
        scaled = centred / (nanstd(rewards) + STD_EPS)
    else:
        raise ValueError(f"scale_rewards must be one of {get_args(ScaleRewards)}, got {scale_rewards!r}")
    return scaled.nan_to_num(nan=0.0)


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """TRL's nanstd: the Bessel-corrected std of the non-NaN values (NaN for fewer than two); dim kept."""
    mean = values.nanmean(dim=dim, keepdim=True)
    variance = ((values - mean) ** 2).nanmean(dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, torch.nan))
    return (variance * correction).sqrt()


def token_coefficients(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int | None = None,
    max_lengths: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Detached c [B, G, R] with ∇ Σ c·log q = −∇ of TRL's loss for the whole step (see the module docstring).

    With m the mask, N_seq = num_sequences and N_tok = num_tokens, both counted over the whole step
    (all microbatches, all processes; default: this tensor's B·G sequences and Σm tokens):

        grpo:    c = A_g m / (N_seq · Σ_t m_g)            mean over sequences of each sequence's token mean
        bnpo:    c = A_g m / (Σ m) · (B·G / N_seq)        token mean of this local batch, averaged over batches
        dr_grpo: c = A_g m / (N_seq · max_completion_length)
        dapo:    c = A_g m / N_tok                        N_tok: TRL's num_items_in_batch, all processes
        seed:    c = A_g m / (L_max(p) · N_seq)           = (1/B_U)(1/G) A_g / L_max(p): the seed's ∇J̄

    Passing global counts lets a caller split the step into pieces whose coefficients add up exactly;
    only bnpo depends on the split (TRL averages local token means), so give it TRL's local batches.
    max_lengths [B] (L_max(p)) is required for "seed", max_completion_length for "dr_grpo".
    """
    B, G = advantages.shape
    mask = response_mask.to(advantages.dtype)
    per_token = advantages.detach()[..., None] * mask
    num_sequences = B * G if num_sequences is None else num_sequences
    if loss_type == "grpo":
        return per_token / (num_sequences * mask.sum(dim=-1, keepdim=True).clamp(min=1.0))
    if loss_type == "bnpo":
        return per_token / mask.sum().clamp(min=1.0) * (B * G / num_sequences)
    if loss_type == "dr_grpo":
        require(max_completion_length is not None, "loss_type='dr_grpo' needs max_completion_length")
        return per_token / (num_sequences * max_completion_length)
    if loss_type == "dapo":
        if num_tokens is None:
            num_tokens = mask.sum()
        return per_token / torch.as_tensor(num_tokens, dtype=mask.dtype, device=mask.device).clamp(min=1.0)
    if loss_type == "seed":
        require(max_lengths is not None, "loss_type='seed' needs max_lengths (L_max per prompt)")
        return per_token / (max_lengths.to(mask.dtype)[:, None, None] * num_sequences)
    raise ValueError(f"loss_type must be one of {get_args(LossType)}, got {loss_type!r}")


def clip_factor(grad_norm: float, max_grad_norm: float | None) -> float:
    """HF Trainer's clipping as a scalar on the step's gradient: min(1, max_grad_norm / (‖g‖ + 1e-6)).

    HF Trainer clips through accelerate into torch.nn.utils.clip_grad_norm_, and only when max_grad_norm > 0.
    """
    if max_grad_norm is None or max_grad_norm <= 0:
        return 1.0
    return min(1.0, max_grad_norm / (grad_norm + CLIP_EPS))
