"""The live optimizer of a training run, read (never written) as the probe's Adam state.

`adam_states` gives each trainable parameter's AdamParamState from torch.optim.Adam/AdamW's own `state` and
`param_groups`, matched by parameter object (HF's Trainer puts the no-decay parameters in a second group), so
adamw_step(states, params, −p.grad) is the step optimizer.step() is about to take.
"""

import torch

from probe_lightning.preconditioning import AdamParamState, NamedParams


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's AcceleratedOptimizer wrapper (the optimizer itself otherwise)."""
    return getattr(optimizer, "optimizer", optimizer)


def unsupported_optimizer(optimizer) -> str | None:
    """Why the exact step cannot be read from this optimizer, or None when it can (Adam or AdamW)."""
    inner = inner_optimizer(optimizer)
    name = type(inner).__name__
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        return f"optimizer {name} is not Adam/AdamW: the probe's step is the exact Adam/AdamW step"
    for group in inner.param_groups:
        for option in ("amsgrad", "maximize"):
            if group.get(option):
                return f"optimizer {name} with {option}=True: the probe's exact step does not model it"
    return None


def adam_states(optimizer, named_params: NamedParams) -> list[AdamParamState]:
    """Each parameter's Adam moments and group hyper-parameters as the next optimizer.step() uses them (zero
    moments and step 0 before the first step). The tensors are the optimizer's own: read, never modified."""
    inner = inner_optimizer(optimizer)
    group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
    missing = [name for name, p in named_params if id(p) not in group_of]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters are not in the optimizer (first: {missing[0]!r})")
    states = []
    for name, p in named_params:
        group, state = group_of[id(p)], inner.state.get(p, {})
        decoupled = isinstance(inner, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
        states.append(
            AdamParamState(
                name=name,
                exp_avg=state["exp_avg"] if "exp_avg" in state else torch.zeros_like(p),
                exp_avg_sq=state["exp_avg_sq"] if "exp_avg_sq" in state else torch.zeros_like(p),
                step=float(state["step"]) if "step" in state else 0.0,
                lr=float(group["lr"]),
                betas=tuple(float(b) for b in group["betas"]),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                decoupled_weight_decay=decoupled,
            )
        )
    return states
