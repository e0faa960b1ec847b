"""The probe's estimators as plain functions on tensors (docs/math.md). No model, no Lightning.

Shapes: B prompts, G responses each, R response positions. Log-probs (S [B, G] or log q [B, G, R]) and
the per-token entropies H [B, G, R] carry the graph to the parameters; every coefficient multiplying a
log-prob is detached, so autograd of a loss here is X(p) or ∇J(p) summed over prompts.
"""

import math

import torch

from probe_lightning.config import EntropyTarget, Estimator, require


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
    raise ValueError(f"entropy_target must be dr_grpo, per_token_avg or budget here, got {mode!r}")


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
    """Per-prompt L_X(p) = -(1/G) Σ_g c_g S(y_g), [B]; its gradient is X(p)."""
    return entropy_terms(seq_logprobs, gen_lens, max_lengths, mode, budget).mean(dim=1)


def entropy_terms(
    seq_logprobs: torch.Tensor, gen_lens: torch.Tensor, max_lengths: torch.Tensor, mode: str, budget: int
) -> torch.Tensor:
    """Each response's term of L_X, [B, G]: -c_g S(y_g); L_X(p) is their mean over the G responses.

    per_token_avg adds the pathwise term -S(y_g)/gen_len_g (not detached), which makes X exactly
    unbiased for E[-S/|y|] when the normaliser is the response's own length.
    """
    weighted = weighted_logprobs(seq_logprobs, gen_lens, max_lengths, mode, budget)
    terms = -(loo_coefficients(weighted) * seq_logprobs)
    return terms - weighted if mode == "per_token_avg" else terms


def loo_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over the other G - 1 responses of the prompt (dim 1), a baseline independent of the
    response itself; 0 (no baseline) when G = 1."""
    G = values.shape[1]
    if G == 1:
        return torch.zeros_like(values)
    return (values.sum(dim=1, keepdim=True) - values) / (G - 1)


def still_to_come(values: torch.Tensor) -> torch.Tensor:
    """Σ_{t>s} values_t at each position s of [..., R]: what token s's choice still influences."""
    return values.flip(-1).cumsum(-1).flip(-1) - values


def entropy_components(
    token_logprobs: torch.Tensor,
    token_entropies: torch.Tensor,
    response_mask: torch.Tensor,
    max_lengths: torch.Tensor,
    target: EntropyTarget,
    estimator: Estimator,
    budget: int,
) -> torch.Tensor:
    """Each response's loss terms [B, G, K]; their mean over G is the prompt's loss, whose gradient gives
    X(p) (docs/math.md "Which entropy").

    K = 1 for budget, per_token_avg and dr_grpo: X(p) = ∇ loss. K = 2 for token_mean: the gradients of
    the two columns estimate ∇E[Σ_t H_t] and ∇E[|y|]; X(p) = (∇col0 − Ĥ_tok ∇col1) / Ê|y| with the
    plug-ins Ĥ_tok, Ê|y| of the whole E batch (`token_mean_weights`).
    rb: the exact per-token entropies H_t with causal score terms (each token's score times the entropy
    still to come); naive: -S as the entropy, one score per response. Baselines: the other responses'.
    """
    require(target != "dr_grpo" or estimator == "naive", "model.estimator rb does not apply to entropy_target dr_grpo")
    mask = response_mask.to(token_logprobs.dtype)
    S = token_logprobs.sum(-1)
    lengths = mask.sum(-1)
    if estimator == "naive" and target != "token_mean":
        return entropy_terms(S, lengths, max_lengths, target, budget)[..., None]
    if estimator == "naive":  # token_mean: −S for Σ_t H_t and |y|, each with its leave-one-out baseline
        neg_s = -S.detach()
        return torch.stack([(neg_s - loo_mean(neg_s)) * S, (lengths - loo_mean(lengths)) * S], dim=-1)
    H = token_entropies * mask
    total_entropy = H.sum(-1)  # [B, G], differentiable: the Σ_t ∇H_t term
    entropy_to_come = still_to_come(H.detach())
    causal = ((entropy_to_come - loo_mean(entropy_to_come)) * token_logprobs).sum(-1)
    if target == "budget":
        return ((total_entropy + causal) / budget)[..., None]
    if target == "per_token_avg":  # f = Σ_t H_t / |y| depends on the whole response: one score per response
        f = total_entropy / lengths.clamp(min=1)
        f_value = f.detach()
        return (f + (f_value - loo_mean(f_value)) * S)[..., None]
    tokens_to_come = still_to_come(mask)
    length_part = ((tokens_to_come - loo_mean(tokens_to_come)) * token_logprobs).sum(-1)
    return torch.stack([total_entropy + causal, length_part], dim=-1)


def token_mean_weights(entropy_sum: float, num_tokens: int, num_responses: int) -> list[float]:
    """X(p) = w · ∇(components): [1 / Ê|y|, −Ĥ_tok / Ê|y|], Ĥ_tok = ΣH_t / Σ|y| and Ê|y| over the E batch."""
    mean_length = num_tokens / num_responses
    token_mean_entropy = entropy_sum / num_tokens
    return [1.0 / mean_length, -token_mean_entropy / mean_length]


def update_loss(seq_logprobs: torch.Tensor, advantages: torch.Tensor, max_lengths: torch.Tensor) -> torch.Tensor:
    """The seed's loss: per-prompt L_Y(p) = (1/G) Σ_g detach(A_g / L_max) S(y_g), [B]; its gradient is ∇J(p)."""
    return (advantages.detach() / max_lengths[:, None] * seq_logprobs).mean(dim=1)


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """⟨a, b⟩ over a list of parameter-shaped tensors, accumulated in float64."""
    return sum(dot64(x, y) for x, y in zip(a, b, strict=True))


def dot64(x: torch.Tensor, y: torch.Tensor, block: int = 4096) -> float:
    """⟨x, y⟩ as dot products of `block`-element pieces (in float32 at least) summed in float64: about
    1e-10 relative on 10⁸ elements, at a quarter of the cost of a float64 copy of both tensors."""
    wide = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.flatten().to(wide), y.flatten().to(wide)
    whole = x.numel() // block * block
    pieces = torch.linalg.vecdot(x[:whole].view(-1, block), y[:whole].view(-1, block))
    return (pieces.double().sum() + torch.dot(x[whole:].double(), y[whole:].double())).item()


def norm(a: list[torch.Tensor]) -> float:
    return math.sqrt(dot(a, a))


def plugin_standard_error(a_e: torch.Tensor, b_u: torch.Tensor, learning_rate: float) -> float:
    """SE(δH₁) ≈ η sqrt(Var(a_e)/B_E + Var(b_u)/B_U); nan where a batch has a single prompt."""
    if len(a_e) < 2 or len(b_u) < 2:
        return float("nan")
    a_e, b_u = a_e.double(), b_u.double()
    return learning_rate * math.sqrt(a_e.var().item() / len(a_e) + b_u.var().item() / len(b_u))


def standard_error_parts(a_e: torch.Tensor, b_u: torch.Tensor, learning_rate: float) -> dict[str, float]:
    """The E and U terms of the plug-in SE, η sqrt(Var(a_e)/B_E) and η sqrt(Var(b_u)/B_U): which batch to grow."""
    part = lambda d: learning_rate * math.sqrt(d.double().var().item() / len(d)) if len(d) > 1 else float("nan")  # noqa: E731
    return {"E": part(a_e), "U": part(b_u)}


# An estimate is resolved when it is at least this many standard errors from 0 (its sign is then known at ~95%).
RESOLVED_SES = 2.0
# The relative standard error sizes_for_target aims at: SE = |δH₁| / 3.
TARGET_RSE = 1.0 / 3.0


def resolved(value: float, se: float | None) -> bool | None:
    """|value| >= RESOLVED_SES · SE; None without a finite SE."""
    if se is None or not math.isfinite(se):
        return None
    return abs(value) >= RESOLVED_SES * se


def sizes_for_target(
    delta_h1: float, se_parts: dict[str, float], sizes: dict[str, int], seconds_per_prompt: dict[str, float],
    target_rse: float = TARGET_RSE,
) -> dict | None:
    """The cheapest B_E and B_U (at this G) whose plug-in SE is target_rse · |δH₁|.

    Each side's per-prompt variance is v = part² · B (part: its term of the SE, standard_error_parts). Minimising
    the time c_E B_E + c_U B_U subject to v_E / B_E + v_U / B_U = (target_rse δH₁)² puts B ∝ sqrt(v / c) on each
    side: a second of either side then buys the same variance. Equal costs where a side's was not measured.
    None where δH₁ = 0 or a part is not finite (a batch of one prompt)."""
    parts = [se_parts.get(role) for role in ("E", "U")]
    if delta_h1 == 0 or any(p is None or not math.isfinite(p) for p in parts):
        return None
    v = {role: part**2 * sizes[role] for role, part in zip(("E", "U"), parts)}
    measured = all(seconds_per_prompt.get(role, 0) > 0 for role in v)
    c = {role: seconds_per_prompt[role] if measured else 1.0 for role in v}
    target_variance = (target_rse * delta_h1) ** 2
    total = sum(math.sqrt(v[role] * c[role]) for role in v) / target_variance
    needed = {role: max(2, math.ceil(math.sqrt(v[role] / c[role]) * total)) for role in v}
    return {
        "target_rse": target_rse,
        "B_E": needed["E"],
        "B_U": needed["U"],
        "seconds": sum(c[role] * needed[role] for role in v) if measured else None,
    }
