"""A checkpoint's Adam state and the two update geometries the probe can use (docs/math.md).

- `adam_precondition`: the seed's geometry, Ȳ = P ⊙ ∇J with P = 1 / (sqrt(v̂) + ε),
  v̂ = exp_avg_sq / (1 − β₂^step); δH₁ = η ⟨X̄, Ȳ⟩.
- `adamw_step`: Δθ, the parameter change torch.optim.AdamW.step() really makes on the trainer's
  gradient g = −∇J (the trainer minimises −J); δH₁ = ⟨X̄, Δθ⟩, the group lr is already inside Δθ.

A torch optimizer state dict indexes its entries by position across its param groups, so matching
it to the model needs the order in which the trainer handed the parameters over: a `ParamLayout`.
Several orders may be plausible (HF Trainer regroups them, see `checkpoints.py`); the one that fits
the saved group sizes and every saved shape is used, and two fitting orders that disagree are an error.
"""

from dataclasses import dataclass, replace

import torch

from probe_lightning.config import ProbeConfigError

NamedParams = list[tuple[str, torch.Tensor]]
ParamLayout = list[NamedParams]  # per saved param group, the (name, parameter) pairs it held, in order


@dataclass
class AdamParamState:
    """One parameter's saved Adam moments and its param group's hyper-parameters."""

    name: str
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: float  # optimizer steps taken so far; the next step's bias corrections use step + 1
    lr: float  # the rate the next step uses (saved after the scheduler stepped)
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool = True  # AdamW; False: torch.optim.Adam's L2 term wd·θ added to g

    def preconditioner(self) -> torch.Tensor:
        bias_correction = 1 - self.betas[1] ** self.step
        return 1.0 / ((self.exp_avg_sq.float() / bias_correction).sqrt() + self.eps)

    def to(self, device: torch.device | str) -> "AdamParamState":
        return replace(self, exp_avg=self.exp_avg.to(device), exp_avg_sq=self.exp_avg_sq.to(device))


# ---- the two geometries ----


def adam_precondition(states: list[AdamParamState], grad: list[torch.Tensor]) -> list[torch.Tensor]:
    """P ⊙ grad per parameter (float32): the seed's update direction, Ȳ = P ∇J̄.

    Relation to `adamw_step` (g = −∇J, t = saved step, P' the preconditioner of the updated v):
    Δθ = −η (β₁ m + (1 − β₁) g) / (1 − β₁^(t+1)) · P' − η wd θ. For a small gradient (P' ≈ P) and no
    weight decay, Δθ ≈ −η β₁ m P / (1 − β₁^(t+1)) + η (1 − β₁) / (1 − β₁^(t+1)) · P ∇J: a momentum
    drift that does not depend on ∇J, plus the seed's direction scaled by (1 − β₁) / (1 − β₁^(t+1)),
    ≈ 0.1 for late steps with β₁ = 0.9. So Δθ ≈ η P ∇J needs m ≈ 0 *and* t = 0 (where v comes from g).
    """
    return [s.preconditioner() * g.float() for s, g in zip(states, grad)]


def adamw_step(
    states: list[AdamParamState], params: list[torch.Tensor], grad: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Δθ = θ_new − θ of torch.optim.AdamW.step() on gradient g = −grad (float32, computed in float64).

    `grad` is ∇J, the ascent direction of the RL objective; the trainer's loss gradient is −∇J.
    With t = saved step: m = β₁ m + (1 − β₁) g, v = β₂ v + (1 − β₂) g², bias corrections
    1 − β^(t+1), Δθ = −η wd θ − η m / (1 − β₁^(t+1)) / (sqrt(v / (1 − β₂^(t+1))) + ε), each
    parameter with its own group's η, betas, ε and weight decay (see adam_precondition for the link).
    """
    return [_next_step(s, p, g)[0].float() for s, p, g in zip(states, params, grad)]


def adamw_step_derivative(
    states: list[AdamParamState], params: list[torch.Tensor], grad: list[torch.Tensor]
) -> list[torch.Tensor]:
    """∂Δθ/∂∇J at `grad`, elementwise (Δθ is elementwise in ∇J, so its Jacobian is this diagonal).

    For the plug-in standard error with adamw_step: b_u = ⟨X̄ ⊙ D, ∇J(p_u)⟩ linearises δH₁ in the
    update batch around ∇J̄ (the delta method).
    """
    derivatives = []
    for state, param, g in zip(states, params, grad):
        _, exp_avg, root, g_trainer, bias_correction1, bias_correction2 = _next_step(state, param, g)
        beta1, beta2 = state.betas
        denom = root + state.eps
        # ∂root/∂g = (1 − β₂) g / (bc₂ root); 0 where root = 0 (then g = 0 and v = 0).
        droot = torch.where(root > 0, (1 - beta2) * g_trainer / (bias_correction2 * root.clamp_min(1e-300)), 0.0)
        # ∂Δθ/∂∇J = −∂Δθ/∂g
        derivative = state.lr / bias_correction1 * ((1 - beta1) / denom - exp_avg * droot / denom**2)
        derivatives.append(derivative.float())
    return derivatives


def _next_step(state: AdamParamState, param: torch.Tensor, grad: torch.Tensor):
    """Float64 pieces of the next step: (Δθ, new exp_avg, sqrt(v̂), trainer gradient g, bc₁, bc₂)."""
    beta1, beta2 = state.betas
    step = state.step + 1
    theta = param.detach().double()
    g = -grad.double()
    if not state.decoupled_weight_decay:  # torch.optim.Adam: L2 penalty folded into the gradient
        g = g + state.weight_decay * theta
    exp_avg = beta1 * state.exp_avg.double() + (1 - beta1) * g
    exp_avg_sq = beta2 * state.exp_avg_sq.double() + (1 - beta2) * g * g
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    root = (exp_avg_sq / bias_correction2).sqrt()
    delta = -(state.lr / bias_correction1) * exp_avg / (root + state.eps)
    if state.decoupled_weight_decay:
        delta = delta - state.lr * state.weight_decay * theta
    return delta, exp_avg, root, g, bias_correction1, bias_correction2


# ---- matching a saved state dict to the parameters ----


def sequential_layout(named_params: NamedParams, state_dict: dict) -> ParamLayout:
    """The parameters in the given order, split over the saved groups by their sizes (`AdamW(params)` order)."""
    sizes = [len(group["params"]) for group in state_dict["param_groups"]]
    if sum(sizes) != len(named_params):
        return [list(named_params)]
    layout, start = [], 0
    for size in sizes:
        layout.append(list(named_params[start : start + size]))
        start += size
    return layout


def adam_states_from_state_dict(
    state_dict: dict,
    named_params: NamedParams,
    source: str = "optimizer state",
    layouts: dict[str, ParamLayout] | None = None,
    name_prefix: str = "",
) -> list[AdamParamState]:
    """Match a torch.optim.Adam/AdamW state dict to the trainable parameters `named_params`.

    `layouts`: candidate orders (description -> layout), first the most likely; default: `named_params`
    in order. The one that fits the saved group sizes and shapes is used; none, or two that fit and
    disagree, is an error. When the saved groups carry `param_names` (optimizers built from
    named_parameters(), torch >= 2.6), those names, less `name_prefix`, decide. Returns one state
    per named_params entry, in that order.
    """
    groups = _adam_param_groups(state_dict, source)
    entries = state_dict["state"]
    layouts = layouts or {"model order": sequential_layout(named_params, state_dict)}
    layout = _saved_names_layout(groups, [*named_params, *_layout_params(layouts)], name_prefix)
    if layout is None or _misfit(layout, groups, entries) is not None:
        layout = _choose_layout(layouts, groups, entries, named_params, source)
    index_of = {n: index for group, saved in zip(layout, groups) for (n, _), index in zip(group, saved["params"])}
    group_of = {index: saved for saved in groups for index in saved["params"]}
    states = []
    for name, param in named_params:
        if name not in index_of:
            raise ProbeConfigError(f"{source}: trainable parameter {name} is not in the optimizer's param groups")
        index = index_of[name]
        states.append(_adam_state(entries.get(index), group_of[index], index, name, param, source))
    return states


def _adam_param_groups(state_dict: dict, source: str) -> list[dict]:
    """The saved param groups, after checking that this is a plain Adam/AdamW state the probe can use."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or not state_dict.get("param_groups"):
        raise ProbeConfigError(f"{source}: not a torch optimizer state dict (needs 'state' and 'param_groups')")
    groups = state_dict["param_groups"]
    for number, group in enumerate(groups):
        if "betas" not in group:
            keys = sorted(k for k in group if k != "params")
            raise ProbeConfigError(
                f"{source}: param group {number} has no betas (its settings: {keys}): not an Adam/AdamW state, "
                "which is all the probe supports; set model.update: identity and learning_rate to probe without it"
            )
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ProbeConfigError(
                    f"{source}: param group {number} has {flag}=True, which the probe does not support: "
                    "use a checkpoint trained with plain Adam/AdamW, or model.update: identity"
                )
    for index, entry in state_dict["state"].items():
        if "exp_avg" not in entry and "exp_avg_sq" not in entry:
            raise ProbeConfigError(
                f"{source}: entry {index} holds {sorted(entry)}, not Adam's exp_avg/exp_avg_sq: unsupported "
                "optimizer (the probe supports torch Adam/AdamW); set model.update: identity to probe without it"
            )
    return groups


def _saved_names_layout(groups: list[dict], named_params: NamedParams, name_prefix: str) -> ParamLayout | None:
    if not all("param_names" in group for group in groups):
        return None
    by_name = dict(named_params)
    names = [[n.removeprefix(name_prefix) for n in group["param_names"]] for group in groups]
    if not all(n in by_name for group in names for n in group):
        return None
    return [[(n, by_name[n]) for n in group] for group in names]


def _layout_params(layouts: dict[str, ParamLayout]) -> NamedParams:
    return [pair for layout in layouts.values() for group in layout for pair in group]


def _entry_shape(entry: dict | None) -> torch.Size | None:
    for key in ("exp_avg_sq", "exp_avg"):
        if entry is not None and key in entry:
            return entry[key].shape
    return None


def _misfit(layout: ParamLayout, groups: list[dict], entries: dict) -> str | None:
    """Why `layout` cannot be the saved order (group sizes, then the first shape), or None if it fits."""
    layout_sizes = [len(group) for group in layout]
    saved_sizes = [len(group["params"]) for group in groups]
    if layout_sizes != saved_sizes:
        return f"its param groups have sizes {saved_sizes}, this order gives {layout_sizes}"
    for group, saved in zip(layout, groups):
        for (name, param), index in zip(group, saved["params"]):
            shape = _entry_shape(entries.get(index))
            if shape is not None and shape != param.shape:
                return f"entry {index} has shape {tuple(shape)}, parameter {name} has shape {tuple(param.shape)}"
    return None


def _choose_layout(
    layouts: dict[str, ParamLayout], groups: list[dict], entries: dict, named_params: NamedParams, source: str
) -> ParamLayout:
    """The one order that fits the saved groups; a clear error when none or two different ones do."""
    misfits = {description: _misfit(layout, groups, entries) for description, layout in layouts.items()}
    fitting = {d: layouts[d] for d, why in misfits.items() if why is None}
    orders = {}  # distinct index -> name orders among the fitting layouts
    for description, layout in fitting.items():
        orders.setdefault(tuple(n for group in layout for n, _ in group), description)
    if len(orders) > 1:
        (first, d1), (second, d2) = list(orders.items())[:2]
        at = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        raise ProbeConfigError(
            f"{source}: ambiguous parameter order: '{d1}' and '{d2}' both fit every saved shape but put "
            f"{first[at]} and {second[at]} at entry {at}: save the optimizer with param_names "
            "(build it from named_parameters()) or from a trainer whose order the probe knows"
        )
    if fitting:
        return next(iter(fitting.values()))
    saved_total = sum(len(group["params"]) for group in groups)
    same_total = [d for d, layout in layouts.items() if sum(len(g) for g in layout) == saved_total]
    if same_total:
        closest = same_total[0]
        raise ProbeConfigError(
            f"{source}: does not match the model in '{closest}' order: {misfits[closest]}: "
            "was it saved for a different model or LoRA config?"
        )
    raise ProbeConfigError(
        f"{source} has {saved_total} entries in {len(groups)} param groups, the model has {len(named_params)} "
        "trainable parameters: was it saved for a different model or LoRA config?"
    )


def _adam_state(entry: dict | None, group: dict, index: int, name: str, param: torch.Tensor, source: str):
    if entry is None:
        raise ProbeConfigError(
            f"{source}: entry {index} ({name}) has no state: the parameter never got a gradient in training "
            "(frozen there, or unused): make the same parameters trainable as in training"
        )
    missing = [key for key in ("exp_avg", "exp_avg_sq", "step") if key not in entry]
    if missing:
        raise ProbeConfigError(
            f"{source}: entry {index} ({name}) has no {'/'.join(missing)} (it holds {sorted(entry)}): "
            "an incomplete Adam state; save the full optimizer.state_dict()"
        )
    for key in ("exp_avg", "exp_avg_sq"):
        if entry[key].shape != param.shape:
            raise ProbeConfigError(
                f"{source}: entry {index} {key} has shape {tuple(entry[key].shape)}, parameter {name} has shape "
                f"{tuple(param.shape)}: was it saved for a different model?"
            )
    return AdamParamState(
        name=name,
        exp_avg=entry["exp_avg"].to(param.device),
        exp_avg_sq=entry["exp_avg_sq"].to(param.device),
        step=float(entry["step"]),
        lr=float(group["lr"]),
        betas=(float(group["betas"][0]), float(group["betas"][1])),
        eps=float(group["eps"]),
        weight_decay=float(group.get("weight_decay", 0.0)),
        # Older torch saved no flag: Adam and AdamW are then indistinguishable; AdamW is what HF/TRL use.
        decoupled_weight_decay=bool(group.get("decoupled_weight_decay", True)),
    )
