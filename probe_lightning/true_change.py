"""The true entropy change of the real step, to hold δH₁ against (docs/math.md "The true change").

θ' = θ + Δθ(η), applied as functional parameters (the model itself is never modified). H(θ') is estimated
on responses sampled at θ by self-normalised importance sampling, w_i = exp(S_θ'(y_i) − S_θ(y_i)), with
the per-token entropies recomputed at θ'; ΔH = H(θ') − H(θ) on the same responses, so their noise cancels.
Every entropy target is a ratio Σ_i w_i num_i / Σ_i w_i den_i (den = |y| for token_mean, else 1).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from probe_lightning.estimators import dot
from probe_lightning.rollout import Rollout
from probe_lightning.sequence_processor import SequenceProcessor, TeacherForcing


@dataclass
class TrueChange:
    delta: float  # ΔH
    se: float  # over prompts (delta method for the difference of two ratios)
    ess: float  # (Σw)² / Σw² over responses


def target_terms(rollout: Rollout, tf: TeacherForcing, target: str, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, den) per response, [B, G] float64: H = E[num] / E[den] for the entropy target."""
    entropy = tf.token_entropies.double().sum(-1)
    lengths = rollout.batch.response_mask.double().sum(-1)
    if target == "token_mean":
        return entropy, lengths
    if target == "budget":
        return entropy / budget, torch.ones_like(entropy)
    if target == "per_token_avg":
        return entropy / lengths.clamp(min=1), torch.ones_like(entropy)
    return -tf.seq_logprobs.double() / rollout.max_lengths.double()[:, None], torch.ones_like(entropy)  # dr_grpo


def score(
    processor: SequenceProcessor, rollouts: list[Rollout], parameters: dict[str, torch.Tensor]
) -> list[TeacherForcing]:
    """Teacher forcing of each rollout with `parameters` in place of the model's own (no gradient)."""
    return [processor.teacher_force_logprobs(r.batch, parameters=parameters) for r in rollouts]


def true_change(
    rollouts: list[Rollout],
    at_theta: list[TeacherForcing],
    at_step: list[TeacherForcing],
    target: str,
    budget: int,
    gather: Callable[[object], list] = lambda value: [value],
) -> TrueChange:
    """ΔH = H(θ') − H(θ) on the rollouts' responses (sampled at θ), from their scores at θ and at θ'.

    gather: every process's share (Collectives.gather), so the estimate is over all of them.
    """
    before = [target_terms(r, tf, target, budget) for r, tf in zip(rollouts, at_theta)]
    after = [target_terms(r, tf, target, budget) for r, tf in zip(rollouts, at_step)]
    log_w = torch.cat([b.seq_logprobs.double() - a.seq_logprobs.double() for a, b in zip(at_theta, at_step)])
    local = (log_w, *(torch.cat(column) for column in zip(*before)), *(torch.cat(column) for column in zip(*after)))
    log_w, num0, den0, num1, den1 = (torch.cat(parts) for parts in zip(*gather([x.cpu() for x in local])))
    w = (log_w - log_w.max()).exp()  # self-normalised: any common factor cancels
    per_prompt = [x.sum(1) for x in (num0, den0, w * num1, w * den1)]
    return TrueChange(_ratio_difference(*per_prompt), _ratio_difference_se(*per_prompt), _ess(w))


def _ratio_difference(num0, den0, num1, den1) -> float:
    return (num1.sum() / den1.sum() - num0.sum() / den0.sum()).item()


def _ratio_difference_se(num0, den0, num1, den1) -> float:
    """SE over prompts of Σnum1/Σden1 − Σnum0/Σden0, linearised: each ratio R = ΣN/ΣD contributes
    (N_p − R D_p) / mean(D) per prompt."""
    if len(num0) < 2:
        return float("nan")
    r0, r1 = num0.sum() / den0.sum(), num1.sum() / den1.sum()
    z = (num1 - r1 * den1) / den1.mean() - (num0 - r0 * den0) / den0.mean()
    return (z.std() / math.sqrt(len(z))).item()


def _ess(w: torch.Tensor) -> float:
    return (w.sum() ** 2 / (w**2).sum()).item()


def token_covariances(token_logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Each token's centred product (log π(y_t) − mean)(A(y_t) − mean), over flat float64 tensors of every
    response token (A broadcast from its response): Cui et al.'s per-token covariance."""
    return (token_logprobs - token_logprobs.mean()) * (advantages - advantages.mean())


def covariance_proxy(token_logprobs: torch.Tensor, advantages: torch.Tensor) -> float:
    """Cov over the U batch's tokens of (log π(y_t), A(y_t)) (Cui et al. 2025); ΔH ≈ −η · this."""
    return token_covariances(token_logprobs, advantages).mean().item()


def log_log_slope(etas: list[float], changes: list[float]) -> float:
    """Least-squares slope of log|ΔH| against log η (1 in the linear regime)."""
    x = torch.tensor([math.log(e) for e in etas], dtype=torch.float64)
    y = torch.tensor([math.log(abs(c)) for c in changes], dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return ((x * y).sum() / (x * x).sum()).item()


def eta_sweep(
    processor: SequenceProcessor,
    named_params: list[tuple[str, torch.Tensor]],
    geometry,
    x_bar: list[torch.Tensor],
    grad_j: list[torch.Tensor],
    etas: list[float],
    evaluation: list[tuple[Rollout, TeacherForcing]],
    entropy_batch: list[tuple[Rollout, TeacherForcing]],
    target: str,
    covariance: float,
    gather: Callable[[object], list] = lambda value: [value],
) -> tuple[list[dict], dict]:
    """One row per η: δH₁(η) = ⟨X̄, Δθ(η)⟩, the true ΔH on the evaluation (V) batch and, labelled, on the
    E batch's own responses (which share δH₁'s samples), and the covariance proxy −η Cov(log π, A).
    Then the summary: the noise floor, the log-log slope and the linear-regime limit."""
    budget = processor.config.max_new_tokens
    params = [p for _, p in named_params]
    v_rollouts, v_scores = [r for r, _ in evaluation], [tf for _, tf in evaluation]
    e_rollouts, e_scores = [r for r, _ in entropy_batch], [tf for _, tf in entropy_batch]
    rows = []
    for eta in etas:
        step = geometry.step(grad_j, params, eta)
        parameters = {name: p.detach() + s.to(p.dtype) for (name, p), s in zip(named_params, step)}
        delta_h1 = dot(x_bar, step)
        v = true_change(v_rollouts, v_scores, score(processor, v_rollouts, parameters), target, budget, gather)
        e = true_change(e_rollouts, e_scores, score(processor, e_rollouts, parameters), target, budget, gather)
        ratio = v.delta / delta_h1 if delta_h1 else float("nan")
        rows.append({
            "eta": eta, "delta_h1": delta_h1, "delta_h_true": v.delta, "delta_h_true_se": v.se, "ess": v.ess,
            "ratio": ratio, "ratio_se": v.se / abs(delta_h1) if delta_h1 else float("nan"),
            "covariance_proxy": -eta * covariance,
            "delta_h_true_on_E": e.delta, "delta_h_true_on_E_se": e.se, "ess_on_E": e.ess,
        })  # fmt: skip
    padded = [replace(r, batch=r.batch.left_padded(8)) for r in v_rollouts]
    at_theta = {name: p.detach() for name, p in named_params}
    at_theta_padded = score(processor, padded, at_theta)
    noise_floor = abs(true_change(padded, v_scores, at_theta_padded, target, budget, gather).delta)
    return rows, sweep_summary(rows, noise_floor)


def sweep_summary(rows: list[dict], noise_floor: float) -> dict:
    """Which η the first-order prediction holds for, and how |ΔH| scales with η there.

    resolvable: |ΔH| above both 2 SE and the noise floor. linear_limit_eta: the largest η of the sweep
    with |ratio − 1| ≤ 0.1 within its SE. slope: of log|ΔH| on log η over the resolvable η up to it.
    """
    resolvable = [
        r for r in rows if r["eta"] > 0 and abs(r["delta_h_true"]) > max(2 * r["delta_h_true_se"], noise_floor)
    ]
    linear = [r for r in resolvable if abs(r["ratio"] - 1) <= 0.1 + r["ratio_se"]]
    limit = max((r["eta"] for r in linear), default=None)
    in_range = [r for r in resolvable if limit is not None and r["eta"] <= limit]
    etas, changes = [r["eta"] for r in in_range], [r["delta_h_true"] for r in in_range]
    slope = log_log_slope(etas, changes) if len(in_range) > 1 else None
    smallest = min(resolvable, key=lambda r: r["eta"], default=None)
    return {
        "noise_floor": noise_floor,
        "linear_limit_eta": limit,
        "slope": slope,
        "ratio_at_smallest_resolvable_eta": smallest["ratio"] if smallest else None,
        "smallest_resolvable_eta": smallest["eta"] if smallest else None,
    }
