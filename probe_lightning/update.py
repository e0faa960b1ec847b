"""The update geometry: how the mean RL gradient ∇J̄ becomes Ȳ, the step δH₁ is measured along.

- identity:           Ȳ = ∇J̄,            δH₁ = η ⟨X̄, Ȳ⟩   (no optimizer state: plain SGD geometry)
- adam_precondition:  Ȳ = P ⊙ ∇J̄,        δH₁ = η ⟨X̄, Ȳ⟩   (the seed's geometry, docs/math.md)
- adamw_step:         Ȳ = Δθ(∇J̄),        δH₁ = ⟨X̄, Δθ⟩    (the exact AdamW step; η is inside Δθ)
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from probe_lightning.config import Update, require
from probe_lightning.preconditioning import AdamParamState, adam_precondition, adamw_step, adamw_step_derivative


def resolve_update(update: Update | None, has_optimizer_state: bool) -> Update:
    """The geometry of the step: by default the exact AdamW step with an Adam state, identity without.

    adam_precondition without a state falls back to identity (P = 1), as the seed's geometry did.
    """
    if update is None:
        return "adamw_step" if has_optimizer_state else "identity"
    require(
        update != "adamw_step" or has_optimizer_state,
        "model.update adamw_step needs an Adam state: set model.checkpoint or model.optimizer_state",
    )
    return update if has_optimizer_state else "identity"


@dataclass
class UpdateGeometry:
    kind: Update
    learning_rate: float
    states: list[AdamParamState] | None = None  # aligned with the trainable parameters; None for identity

    @classmethod
    def build(cls, kind: Update, learning_rate: float, states: list[AdamParamState] | None) -> "UpdateGeometry":
        if kind == "adamw_step":
            # A configured η overrides the saved group rates; otherwise each group keeps its own.
            return cls(kind, learning_rate, [replace(s, lr=learning_rate) for s in states])
        return cls(kind, learning_rate, states if kind == "adam_precondition" else None)

    @property
    def scale(self) -> float:
        """δH₁ = scale · ⟨X̄, Ȳ⟩."""
        return 1.0 if self.kind == "adamw_step" else self.learning_rate

    def step_direction(self, grad_j: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Ȳ from ∇J̄ = ΣY / B_U."""
        if self.kind == "adam_precondition":
            return adam_precondition(self.states, grad_j)
        if self.kind == "adamw_step":
            return adamw_step(self.states, params, grad_j)
        return grad_j

    def step(self, grad_j: list[torch.Tensor], params: list[torch.Tensor], eta: float) -> list[torch.Tensor]:
        """Δθ(η), the parameter change of this geometry's step at learning rate η (linear in η)."""
        if self.kind == "adamw_step":
            return adamw_step([replace(s, lr=eta) for s in self.states], params, grad_j)
        return [eta * y for y in self.step_direction(grad_j, params)]

    def step_derivative(
        self, grad_j: list[torch.Tensor], params: list[torch.Tensor]
    ) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        """g ↦ (∂Ȳ/∂∇J at grad_j) g: Ȳ's own map for the linear geometries (P ⊙ g, or g), D ⊙ g for adamw_step
        (D = adamw_step_derivative, computed once here). A gradient piece's first-order share of the step; the map is
        diagonal, so it is its own transpose: applied to X̄ it gives v with b_u = ⟨v, ∇J(p_u)⟩ = ⟨X̄, ∂Ȳ/∂∇J ∇J(p_u)⟩
        (for the linear geometries the b_u / B_U sum to ⟨X̄, Ȳ⟩ exactly; adamw_step linearises Δθ at ∇J̄)."""
        if self.kind != "adamw_step":
            return lambda g: self.step_direction(g, params)
        derivative = adamw_step_derivative(self.states, params, grad_j)
        return lambda g: [d * x for d, x in zip(derivative, g)]
