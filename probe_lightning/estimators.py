"""The probe's estimators as plain functions on tensors (MATH.md). No model, no Lightning.

Shapes: B prompts, G responses each. seq_logprobs S [B, G] carries the graph to the parameters;
everything multiplying it is detached, so autograd of a loss here is X(p) or ∇J(p) summed over prompts.
"""

import math

import torch

WEIGHTING_MODES = ("dr_grpo", "per_token_avg", "budget")


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """DR-GRPO: A_g = r_g - mean_g' r_g' per prompt. [B, G] -> [B, G]."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def weighted_logprobs(
    seq_logprobs: torch.Tensor, gen_lens: torch.Tensor, max_lengths: torch.Tensor, mode: str, budget: int
) -> torch.Tensor:
    """S_w,g: S / L_max(p) (dr_grpo), S / gen_len_g (per_token_avg) or S / max_new_tokens (budget)."""
    if mode == "dr_grpo":
        return seq_logprobs / max_lengths[:, None]
    if mode == "per_token_avg":
        return seq_logprobs / gen_lens
    if mode == "budget":
        return seq_logprobs / budget
    raise ValueError(f"weighting_mode must be one of {WEIGHTING_MODES}, got {mode!r}")


def loo_coefficients(weighted: torch.Tensor) -> torch.Tensor:
    """c_g = detach(S_w,g - mean_{g' != g} S_w,g'); with G = 1 no baseline exists and c_g = S_w,g."""
    weighted = weighted.detach()
    G = weighted.shape[1]
    if G == 1:
        return weighted
    others_mean = (weighted.sum(dim=1, keepdim=True) - weighted) / (G - 1)
    return weighted - others_mean


def entropy_loss(
    seq_logprobs: torch.Tensor, gen_lens: torch.Tensor, max_lengths: torch.Tensor, mode: str, budget: int
) -> torch.Tensor:
    """Per-prompt L_X(p) = -(1/G) Σ_g c_g S(y_g), [B]; its gradient is X(p).

    per_token_avg adds the pathwise term -(1/G) Σ_g S(y_g)/gen_len_g (not detached), which makes X
    exactly unbiased when the normaliser is the response's own length.
    """
    weighted = weighted_logprobs(seq_logprobs, gen_lens, max_lengths, mode, budget)
    loss = -(loo_coefficients(weighted) * seq_logprobs).mean(dim=1)
    if mode == "per_token_avg":
        loss = loss - weighted.mean(dim=1)
    return loss


def update_loss(seq_logprobs: torch.Tensor, advantages: torch.Tensor, max_lengths: torch.Tensor) -> torch.Tensor:
    """Per-prompt L_Y(p) = (1/G) Σ_g detach(A_g / L_max) S(y_g), [B]; its gradient is ∇J(p)."""
    return (advantages.detach() / max_lengths[:, None] * seq_logprobs).mean(dim=1)


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """⟨a, b⟩ over a list of parameter-shaped tensors, accumulated in float64."""
    return sum(torch.dot(x.double().flatten(), y.double().flatten()).item() for x, y in zip(a, b, strict=True))


def norm(a: list[torch.Tensor]) -> float:
    return math.sqrt(dot(a, a))


def plugin_standard_error(a_e: torch.Tensor, b_u: torch.Tensor, learning_rate: float) -> float:
    """SE(δH₁) ≈ η sqrt(Var(a_e)/B_E + Var(b_u)/B_U); nan where a batch has a single prompt."""
    if len(a_e) < 2 or len(b_u) < 2:
        return float("nan")
    a_e, b_u = a_e.double(), b_u.double()
    return learning_rate * math.sqrt(a_e.var().item() / len(a_e) + b_u.var().item() / len(b_u))
