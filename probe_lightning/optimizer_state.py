"""One source for the optimizer state and η: a checkpoint's, a bare optimizer-state file's, or none.

The saved param-group lr is the rate of the *next* step: trainers step the scheduler right after the
optimizer and save later (see checkpoints.py). A configured η wins over it.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from probe_lightning.config import ProbeConfigError, require
from probe_lightning.preconditioning import AdamParamState, NamedParams, adam_states_from_state_dict

log = logging.getLogger(__name__)



@dataclass
class OptimizerState:
    """A saved optimizer as the probe uses it, from any source (checkpoint folder, .ckpt, bare file)."""

    adam_states: list[AdamParamState] | None  # aligned with the trainable parameters; None when not loaded
    learning_rate: float | None  # the next step's lr from the saved param groups; None if absent or they differ
    learning_rate_source: str


def no_optimizer_state() -> OptimizerState:
    """No checkpoint or optimizer-state file: no Adam state, and η at TRL GRPOConfig's default, 1e-6."""
    return OptimizerState(None, 1e-6, "default (TRL's GRPOConfig learning_rate: no checkpoint or optimizer_state)")


def load_optimizer_state(path: str, named_params: NamedParams, load_states: bool = True) -> OptimizerState:
    """A `torch.save(optimizer.state_dict())` file whose optimizer got the parameters in model order."""
    source = f"optimizer_state {path!r}"
    require(Path(path).is_file(), f"model.optimizer_state: no such file {path!r}")
    fix = "save it again with torch.save(optimizer.state_dict(), path) or point model.optimizer_state at another file"
    state_dict = load_torch_file(path, source, fix)
    states = adam_states_from_state_dict(state_dict, named_params, source=source) if load_states else None
    return OptimizerState(states, *next_learning_rate(state_dict, source))


def resolve_learning_rate(configured: float | None, optimizer: OptimizerState) -> tuple[float, str]:
    """η and where it came from: the config wins, else the saved next-step rate."""
    if configured is not None:
        learning_rate, source = configured, "config (model.learning_rate)"
    else:
        require(
            optimizer.learning_rate is not None,
            f"model.learning_rate is not set and {optimizer.learning_rate_source}",
        )
        learning_rate, source = optimizer.learning_rate, optimizer.learning_rate_source
    if learning_rate == 0:
        log.warning(
            "η = 0 (from %s), so the predicted change is 0 by construction (the end of a decaying schedule?): "
            "set model.learning_rate to probe a step of a chosen size",
            source,
        )
    return learning_rate, source


def next_learning_rate(state_dict: dict | None, source: str) -> tuple[float | None, str]:
    if not isinstance(state_dict, dict) or not state_dict.get("param_groups"):
        return None, f"none: {source} is absent or has no param groups"
    rates = sorted({float(group["lr"]) for group in state_dict["param_groups"] if group["params"]})
    if len(rates) != 1:
        return None, f"none: the param groups of {source} have different lr {rates}: set learning_rate"
    return rates[0], f"{source} param groups (the next step's lr, saved after scheduler.step())"


def load_torch_file(path: str | Path, source: str, fix: str):
    """torch.load(weights_only=True) of an optimizer state or a Lightning checkpoint; a bad file is one error line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged bytes fail anywhere in the unpickler: RuntimeError, EOFError, KeyError, ...
        reason = _first_sentence(err)
        if "Unsupported global" in reason:
            raise ProbeConfigError(
                f"{source}: torch.load(weights_only=True) refused it ({reason}): it holds pickled Python objects "
                "(e.g. a Lightning checkpoint's hyper_parameters); save it without them"
            ) from err
        raise ProbeConfigError(f"{source} is truncated or corrupt: torch.load fails ({reason}): {fix}") from err


def _first_sentence(err: Exception) -> str:
    """The gist of a torch.load error, whose text runs over many lines of advice."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {line.split('. ')[0]}" if line else type(err).__name__
