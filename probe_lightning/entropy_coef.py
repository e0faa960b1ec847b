"""The entropy bonus that holds the watched entropy steady: the entropy_coef c* at which the predicted step leaves it
unchanged, δH₁(c*) = 0, with its standard error (docs/math.md §9, "The entropy bonus that holds entropy steady").

TRL's gradient is affine in its entropy coefficient c: ∇J̄(c) = ḡ + (c − c₀) g_b before clipping, with ḡ the probe's
∇J̄ at the checkpoint's coefficient c₀ and g_b the bonus's gradient per unit coefficient (∇ of Σ H_t m_eff / Σ m_eff
over the U batch, pathwise). The trainer clips it, ĝ(c) = f(‖∇J̄(c)‖) ∇J̄(c), and the geometry makes the step:

    δH₁(c) = ⟨X̄, Δθ(ĝ(c))⟩

- identity, adam_precondition: Δθ = η P ĝ and f > 0, so δH₁(c) = η f(c) (⟨X̄, P ḡ⟩ + (c − c₀) ⟨X̄, P g_b⟩) has one
  zero, c* = c₀ − ⟨X̄, P ḡ⟩ / ⟨X̄, P g_b⟩, clipped or not ("linear");
- adamw_step: a root search over c ≥ 0 ("root search"), each δH₁(c) one elementwise pass over the parameters.

TRL's entropy_coef is a bonus, c ≥ 0 ("a positive value adds an entropy bonus"; TRL does not check the sign): a zero
outside that range is reported with exists false and why.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from probe_lightning.estimators import dot, dot64, plugin_standard_error
from probe_lightning.preconditioning import adamw_step, adamw_step_derivative
from probe_lightning.trainer_loss import CLIP_EPS, clip_factor
from probe_lightning.update import UpdateGeometry

RELATIVE_TOLERANCE = 1e-10  # the root search's, in c
DOUBLINGS = 40  # the root search looks for a sign change up to 2**40 times its first guess
ADAPTIVE_MAX = 1.0  # GRPOConfig's default entropy_coef_max, the adaptive controller's ceiling


@dataclass
class CoefficientStep:
    """The trainer's gradient as a function of the entropy coefficient c: ∇J̄(c) = ḡ + (c − c₀) g_b, clipped as the
    trainer clips it: ĝ(c) = f(c) ∇J̄(c) = α(c) ĝ₀ + β(c) g_b, with ĝ₀ = f₀ ḡ the probe's clipped ∇J̄."""

    grad_j: list[torch.Tensor]  # ĝ₀: the probe's ∇J̄ at c₀, clipped
    bonus_grad: list[torch.Tensor]  # g_b: ∇ of the bonus term at coefficient 1
    grad_norm: float  # ‖ḡ‖, before clipping
    clip: float  # f₀
    checkpoint_coef: float  # c₀: the coefficient the trainer applies next
    max_grad_norm: float | None
    bonus_scale: float  # a U prompt's piece of g_b is bonus_scale · ∇(its bonus loss)
    cross: float = field(init=False)  # ⟨ḡ, g_b⟩
    bonus_norm2: float = field(init=False)  # ‖g_b‖²

    def __post_init__(self):
        self.cross = dot(self.grad_j, self.bonus_grad) / self.clip
        self.bonus_norm2 = dot(self.bonus_grad, self.bonus_grad)

    def norm(self, c: float) -> float:
        """‖∇J̄(c)‖ before clipping."""
        d = c - self.checkpoint_coef
        return math.sqrt(max(self.grad_norm**2 + 2 * d * self.cross + d * d * self.bonus_norm2, 0.0))

    def weights(self, c: float) -> tuple[float, float, float, float]:
        """(α, β, dα/dc, dβ/dc): ĝ(c) = α ĝ₀ + β g_b. The clip factor f = max_grad_norm / (‖∇J̄‖ + ε) where it
        clips, with df/dc = −f / (‖∇J̄‖ + ε) · d‖∇J̄‖/dc."""
        d, norm = c - self.checkpoint_coef, self.norm(c)
        f = clip_factor(norm, self.max_grad_norm)
        slope = 0.0 if f == 1.0 or norm == 0 else -f / (norm + CLIP_EPS) * (self.cross + d * self.bonus_norm2) / norm
        return f / self.clip, f * d, slope / self.clip, slope * d + f


class EntropyCoefficient:
    """δH₁ as a function of the entropy coefficient, its zero c*, and the delta method's standard error of c*."""

    def __init__(self, geometry: UpdateGeometry, step: CoefficientStep, x_bar, params, delta_h1: float):
        self.geometry, self.step, self.x_bar, self.params = geometry, step, x_bar, params
        self.linear = geometry.kind != "adamw_step"
        self.scale = geometry.scale
        self.delta_h1_at_checkpoint = delta_h1
        if self.linear:  # δH₁(c) = scale (α ⟨X̄, Ȳ⟩ + β ⟨X̄, P g_b⟩)
            self.y_dot = delta_h1 / self.scale if self.scale else 0.0
            self.bonus_dot = dot(x_bar, geometry.step_direction(step.bonus_grad, params))

    def delta_h1(self, c: float) -> float:
        """⟨X̄, Δθ(ĝ(c))⟩."""
        alpha, beta, _, _ = self.step.weights(c)
        if self.linear:
            return self.scale * (alpha * self.y_dot + beta * self.bonus_dot)
        return self._adamw_sum(alpha, beta, lambda s, p, g, x, *_: dot64(x, adamw_step([s], [p], [g])[0]))

    def slope(self, c: float) -> float:
        """∂δH₁/∂c = ⟨X̄, ∂Δθ/∂∇J · dĝ/dc⟩ (Δθ is elementwise in ∇J)."""
        alpha, beta, d_alpha, d_beta = self.step.weights(c)
        if self.linear:
            return self.scale * (d_alpha * self.y_dot + d_beta * self.bonus_dot)

        def term(state, param, g, x, g0, gb):
            return dot64(x * adamw_step_derivative([state], [param], [g])[0], d_alpha * g0 + d_beta * gb)

        return self._adamw_sum(alpha, beta, term)

    def _adamw_sum(self, alpha: float, beta: float, term: Callable) -> float:
        """Σ over the parameters of term(state, param, ĝ(c), X̄, ĝ₀, g_b), one parameter at a time (no model-sized
        step is ever held)."""
        total = 0.0
        parts = zip(self.geometry.states, self.params, self.step.grad_j, self.step.bonus_grad, self.x_bar)
        for state, param, g0, gb, x in parts:
            total += term(state, param, alpha * g0.double() + beta * gb.double(), x, g0, gb)
        return total

    def solve(self) -> tuple[float | None, float, str | None]:
        """(c*, δH₁(0), why no c* ≥ 0 holds the entropy, or None); a linear geometry's c* even when negative."""
        at_zero = self.delta_h1(0.0)
        if self.linear:
            if self.bonus_dot == 0:
                return None, at_zero, "the bonus does not change this entropy to first order (⟨X̄, P g_b⟩ = 0)"
            root = self.step.checkpoint_coef - self.y_dot / self.step.clip / self.bonus_dot
            return root, at_zero, None if root >= 0 else self._negative(root, at_zero)
        if at_zero == 0:
            return 0.0, at_zero, None
        lower, at_lower, upper = 0.0, at_zero, self._first_guess()
        for _ in range(DOUBLINGS + 1):  # the first sign change on 0, c₁, 2c₁, 4c₁, ...
            at_upper = self.delta_h1(upper)
            if at_upper == 0 or (at_upper > 0) != (at_lower > 0):
                return _illinois(self.delta_h1, lower, at_lower, upper, at_upper), at_zero, None
            lower, at_lower, upper = upper, at_upper, 2 * upper
        return None, at_zero, self._no_root(at_zero, lower, at_lower)

    def _first_guess(self) -> float:
        """Newton's step from c₀, if it lands above 0; else where the bonus's gradient is as long as ḡ; else 1."""
        c0, slope = self.step.checkpoint_coef, self.slope(self.step.checkpoint_coef)
        guess = c0 - self.delta_h1_at_checkpoint / slope if slope else math.nan
        if guess > 0 and math.isfinite(guess):
            return guess
        ratio = self.step.grad_norm / math.sqrt(self.step.bonus_norm2) if self.step.bonus_norm2 else math.nan
        return ratio if ratio > 0 and math.isfinite(ratio) else 1.0

    def _negative(self, root: float, at_zero: float) -> str:
        if at_zero > 0:
            why = f"the step already raises the entropy (δH₁(0) = {at_zero:.3g}) and the bonus raises it further"
        else:
            why = (f"the bonus lowers this entropy too (∂δH₁/∂c = {self.slope(root):.3g}: it raises the U batch's "
                   "token entropies, not necessarily the watched one), as the step does")  # fmt: skip
        return f"{why}: only a negative entropy_coef ({root:.4g}, an entropy penalty) would hold it"

    def _no_root(self, at_zero: float, largest: float, at_largest: float) -> str:
        if self.slope(0.0) * at_zero > 0:
            why = "the bonus pushes the entropy the way the step does"
        else:
            why = ("the bonus's share of the AdamW step saturates (Adam normalises each coordinate, clipping caps the "
                   "norm) before it outweighs the rest of the step (momentum drift, weight decay)")  # fmt: skip
        return (f"δH₁(c) keeps the sign of δH₁(0) = {at_zero:.3g} from c = 0 to {largest:.3g} "
                f"(δH₁ = {at_largest:.3g} there): {why}")  # fmt: skip

    def standard_error(self, c: float, slope: float, entropy_terms: dict[str, torch.Tensor],
                       update_terms: torch.Tensor, bonus_terms: torch.Tensor) -> float:  # fmt: skip
        """SE(c*) = SE(δH₁(c*)) / |∂δH₁/∂c| (delta method), with δH₁(c*)'s plug-in SE (§6) from each E prompt's
        a_e(c*) = a_e + (α − 1) ⟨X(e), D₀ ĝ₀⟩ + β ⟨X(e), D₀ g_b⟩ and each U prompt's b_u(c*) = α b_u + β b_u^b, the
        step linearised at the probe's own ĝ₀ (D₀ = ∂Δθ/∂∇J there; η P for a linear geometry, where this is exact)
        and the clip factor held at f(c*), as §6 holds it."""
        alpha, beta, _, _ = self.step.weights(c)
        along_y = entropy_terms["y_bar"]
        along_gradient = entropy_terms.get("gradient_step", along_y)  # a linear geometry's D₀ ĝ₀ is Ȳ itself
        a_e = along_y + (alpha - 1) * along_gradient + beta * entropy_terms["bonus_step"]
        b_u = alpha * update_terms + beta * bonus_terms
        return plugin_standard_error(a_e, b_u, self.scale) / abs(slope) if slope else math.nan


def entropy_coef_for_zero(
    geometry: UpdateGeometry,
    step: CoefficientStep,
    x_bar: list[torch.Tensor],
    params: list[torch.Tensor],
    delta_h1: float,
    entropy_terms: dict[str, torch.Tensor],
    update_terms: torch.Tensor,
    bonus_terms: torch.Tensor,
    adaptive: bool,
) -> dict:
    """The counterfactual entry: c*, its SE, whether a c* >= 0 exists, δH₁ at c₀ and at 0, ∂δH₁/∂c at c*.

    entropy_terms: per E prompt, ⟨X(e), ·⟩ along "y_bar", "bonus_step" (D₀ g_b) and, for adamw_step, "gradient_step"
    (D₀ ĝ₀), the E pass's directions (Probe._estimate); update_terms: per U prompt, b_u
    (§6); bonus_terms: per U prompt, b_u^b = bonus_scale · ⟨v, ∇(its bonus loss)⟩ along the same v."""
    coefficient = EntropyCoefficient(geometry, step, x_bar, params, delta_h1)
    root, at_zero, note = coefficient.solve()
    entry = {
        "value": root, "se": None, "exists": root is not None and root >= 0,
        "delta_h1_at_checkpoint_coef": delta_h1, "checkpoint_coef": step.checkpoint_coef,
        "delta_h1_at_zero_coef": at_zero, "delta_h1_slope": None,
        "method": "linear" if coefficient.linear else "root search", "note": note,
    }  # fmt: skip
    if root is not None:
        entry["delta_h1_slope"] = slope = coefficient.slope(root)
        entry["se"] = coefficient.standard_error(root, slope, entropy_terms, update_terms, bonus_terms)
    if adaptive and entry["exists"] and root > ADAPTIVE_MAX:
        entry["note"] = (
            f"use_adaptive_entropy: c* is above GRPOConfig's default entropy_coef_max = {ADAPTIVE_MAX}, the "
            "controller's ceiling unless the run raised it"
        )
    return entry


def _illinois(function: Callable[[float], float], a: float, at_a: float, b: float, at_b: float) -> float:
    """A zero of function in the bracket [a, b] (signs of at_a and at_b differ), to RELATIVE_TOLERANCE in c:
    false position with the Illinois halving, and a bisection whenever the bracket did not halve in two steps."""
    if at_b == 0:
        return b
    side, widths = 0, [math.inf, math.inf]
    while abs(b - a) > RELATIVE_TOLERANCE * max(abs(a), abs(b)):
        bisect = abs(b - a) > 0.5 * widths[-2]
        c = 0.5 * (a + b) if bisect else (a * at_b - b * at_a) / (at_b - at_a)
        if not min(a, b) < c < max(a, b):
            c = 0.5 * (a + b)
        at_c = function(c)
        if at_c == 0:
            return c
        if (at_c > 0) == (at_b > 0):  # the zero lies in [a, c]
            b, at_b = c, at_c
            if side == -1:
                at_a /= 2
            side = -1
        else:
            a, at_a = c, at_c
            if side == 1:
                at_b /= 2
            side = 1
        widths.append(abs(b - a))
    return 0.5 * (a + b)
