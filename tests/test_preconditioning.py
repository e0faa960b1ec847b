"""Adam state matching and the two update geometries, against torch.optim's own optimizers."""

import copy

import pytest
import torch
from torch import nn

from probe_lightning.config import ProbeConfigError
from probe_lightning.optimizer_state import load_optimizer_state
from probe_lightning.preconditioning import (
    adam_precondition,
    adam_states_from_state_dict,
    adamw_step,
    adamw_step_derivative,
)


def small_model(hidden: int = 4, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 3)).to(dtype)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    """Real steps on a regression loss, so step > 1 and both moments are non-zero."""
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 5, dtype=next(model.parameters()).dtype)
        loss = (model(x) ** 2).mean() + model(x).sum() * 0.1
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def named(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def three_groups(model: nn.Module) -> list[dict]:
    first, norm, last = model[0], model[1], model[2]
    return [
        {"params": list(first.parameters()), "lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
        {"params": list(norm.parameters()), "lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0},
        {"params": list(last.parameters()), "lr": 5e-3, "betas": (0.95, 0.999), "eps": 1e-7, "weight_decay": 0.3},
    ]


def reference_step(model, optimizer_cls, state_dict, ascent: list[torch.Tensor]) -> list[torch.Tensor]:
    """θ_new − θ from optimizer_cls.step() on a copy of the model and state, with gradient −∇J."""
    twin = copy.deepcopy(model)
    optimizer = optimizer_cls(three_groups(twin))
    optimizer.load_state_dict(copy.deepcopy(state_dict))
    before = [p.detach().clone() for p in twin.parameters()]
    for param, g in zip(twin.parameters(), ascent):
        param.grad = -g.clone()
    optimizer.step()
    return [p.detach() - b for p, b in zip(twin.parameters(), before)]


def random_ascent(model, scale: float = 1.0) -> list[torch.Tensor]:
    torch.manual_seed(2)
    return [scale * torch.randn_like(p) for p in model.parameters()]


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.Adam])
def test_adamw_step_is_the_change_torch_optimizer_step_makes(optimizer_cls):
    """Three groups with their own lr/betas/eps/weight decay, after 3 real steps; Adam: L2 weight decay."""
    model = small_model()
    optimizer = optimizer_cls(three_groups(model))
    train(model, optimizer)
    states = adam_states_from_state_dict(optimizer.state_dict(), named(model))
    assert [s.step for s in states] == [3.0] * 6
    ascent = random_ascent(model)

    delta = adamw_step(states, [p for p in model.parameters()], ascent)

    expected = reference_step(model, optimizer_cls, optimizer.state_dict(), ascent)
    for ours, theirs in zip(delta, expected):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item())


def test_adamw_step_ascends_j():
    """With no momentum and no weight decay the step moves along +∇J (the trainer descends −J)."""
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), weight_decay=0.0)
    train(model, optimizer, steps=1)
    states = adam_states_from_state_dict(optimizer.state_dict(), named(model))
    for state in states:
        state.exp_avg.zero_()
    ascent = random_ascent(model)

    delta = adamw_step(states, list(model.parameters()), ascent)

    for d, g in zip(delta, ascent):
        assert torch.equal(torch.sign(d.double()), torch.sign(g))


def test_adam_precondition_is_p_times_gradient():
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.99), eps=1e-5)
    train(model, optimizer, steps=2)
    states = adam_states_from_state_dict(optimizer.state_dict(), named(model))
    ascent = random_ascent(model)

    direction = adam_precondition(states, ascent)

    for state, d, g in zip(states, direction, ascent):
        v_hat = state.exp_avg_sq / (1 - 0.99**2)
        torch.testing.assert_close(d, (g / (v_hat.sqrt() + 1e-5)).float())


def test_adamw_step_is_scaled_precondition_without_momentum():
    """Docstring claim: m = 0, wd = 0, small g, late step t: Δθ ≈ η (1 − β₁)/(1 − β₁^(t+1)) P ∇J."""
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    train(model, optimizer, steps=1)
    states = adam_states_from_state_dict(optimizer.state_dict(), named(model))
    for state in states:
        state.exp_avg.zero_()
        state.step = 10_000.0
    ascent = random_ascent(model, scale=1e-6)

    delta = adamw_step(states, list(model.parameters()), ascent)

    scale = 1e-3 * (1 - 0.9) / (1 - 0.9**10_001)
    for d, p in zip(delta, adam_precondition(states, ascent)):
        torch.testing.assert_close(d, scale * p, rtol=1e-3, atol=0.0)


def test_adamw_step_derivative_is_the_jacobian_diagonal():
    model = small_model()
    optimizer = torch.optim.AdamW(three_groups(model))
    train(model, optimizer)
    states = adam_states_from_state_dict(optimizer.state_dict(), named(model))
    params = list(model.parameters())
    ascent = [g.requires_grad_() for g in random_ascent(model, scale=0.3)]

    derivative = adamw_step_derivative(states, params, ascent)

    # Δθ is elementwise in ∇J, so ∂(Σ Δθ)/∂∇J is the Jacobian's diagonal.
    expected = torch.autograd.grad(sum(d.sum() for d in adamw_step(states, params, ascent)), ascent)
    for ours, theirs in zip(derivative, expected):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-9)


def test_states_follow_saved_param_names_over_model_order():
    """An optimizer built from named_parameters() in another order is matched by its saved names."""
    model = small_model()
    shuffled = list(reversed(named(model)))
    optimizer = torch.optim.AdamW(shuffled, lr=1e-2)
    train(model, optimizer)

    states = adam_states_from_state_dict(optimizer.state_dict(), named(model))

    for state, (name, param) in zip(states, named(model)):
        assert state.name == name
        assert torch.equal(state.exp_avg_sq, optimizer.state[param]["exp_avg_sq"])


def saved_state(tmp_path, model, optimizer, steps=1) -> str:
    train(model, optimizer, steps)
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    return str(path)


def test_load_optimizer_state_reads_a_saved_optimizer_file(tmp_path):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    path = saved_state(tmp_path, model, optimizer, steps=2)

    states = load_optimizer_state(path, named(model)).adam_states

    assert [s.name for s in states] == [n for n, _ in named(model)]
    for state, param in zip(states, model.parameters()):
        assert torch.equal(state.exp_avg, optimizer.state[param]["exp_avg"])
        assert (state.step, state.lr, state.weight_decay, state.decoupled_weight_decay) == (2.0, 2e-3, 0.05, True)


def test_count_mismatch_names_both_counts(tmp_path):
    model = small_model()
    path = saved_state(tmp_path, model, torch.optim.AdamW(model.parameters()))
    fewer = named(model)[:-1]

    with pytest.raises(ProbeConfigError, match="has 6 entries in 1 param groups, the model has 5 trainable parameters"):
        load_optimizer_state(path, fewer).adam_states


def test_shape_mismatch_names_the_first_parameter_and_both_shapes(tmp_path):
    model = small_model(hidden=4)
    path = saved_state(tmp_path, model, torch.optim.AdamW(model.parameters()))
    wider = small_model(hidden=6)

    with pytest.raises(ProbeConfigError, match=r"entry 0 has shape \(4, 5\), parameter 0.weight has shape \(6, 5\)"):
        load_optimizer_state(path, named(wider)).adam_states


@pytest.mark.parametrize("key", ["exp_avg_sq", "step"])
def test_missing_adam_entry_is_an_error(tmp_path, key):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters())
    train(model, optimizer)
    state_dict = optimizer.state_dict()
    del state_dict["state"][2][key]
    path = tmp_path / "optimizer.pt"
    torch.save(state_dict, path)

    with pytest.raises(ProbeConfigError, match=rf"entry 2 \(1.weight\) has no {key}"):
        load_optimizer_state(str(path), named(model)).adam_states


@pytest.mark.parametrize(
    "make_optimizer, message",
    [
        (lambda params: torch.optim.AdamW(params, amsgrad=True), "amsgrad=True, which the probe does not support"),
        (lambda params: torch.optim.AdamW(params, maximize=True), "maximize=True, which the probe does not support"),
        (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), "has no betas .*not an Adam/AdamW state"),
    ],
    ids=["amsgrad", "maximize", "sgd"],
)
def test_unsupported_optimizers_are_refused(tmp_path, make_optimizer, message):
    model = small_model()
    path = saved_state(tmp_path, model, make_optimizer(model.parameters()))

    with pytest.raises(ProbeConfigError, match=message):
        load_optimizer_state(path, named(model)).adam_states


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ProbeConfigError, match="optimizer_state: no such file"):
        load_optimizer_state(str(tmp_path / "nothing.pt"), []).adam_states
