"""The true entropy change of the real step (the η sweep) against exact enumeration, in the world with EOS."""

import functools

import pytest
import torch
from enumerable_world import PROMPTS
from eos_world import exact_targets, save_eos_world
from probe_helpers import make_probe, prompt_batches

from probe_lightning.models import load_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ETAS = [0.0, 0.5, 1.0, 2.0]
EVALUATION_PROMPTS = PROMPTS * 640  # 10,240 responses: the SE of ΔH below 10% of it


@pytest.fixture(scope="module")
def eos_world(tmp_path_factory) -> str:
    return save_eos_world(tmp_path_factory.mktemp("eos_world"))


@functools.cache
def swept(world: str):
    """One probe with an η sweep; its finished result and the probe (for Δθ(η))."""
    probe = make_probe(world, G=4, G_E=4, entropy_target="token_mean", estimator="rb", eta_sweep=ETAS)
    for batch in prompt_batches(0, PROMPTS * 4, PROMPTS * 4, 4096, EVALUATION_PROMPTS, seed=5):
        out = probe.step(batch)
    return out.finished, probe


@functools.cache
def exact_change(world: str, eta: float) -> tuple[float, float]:
    """(exact H(θ') − H(θ), exact first order ⟨∇H, Δθ(η)⟩) for the probe's own step Δθ(η)."""
    _, probe = swept(world)
    params = [p for _, p in probe.named_params]
    step = probe.geometry.step(probe.vectors.grad_j, params, eta)
    model, tokenizer = load_model_and_tokenizer(world, dtype=torch.float64)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("lm_head"))
    questions = [p.question for p in PROMPTS]
    h0, grad = exact_targets(model, tokenizer, questions)["token_mean"]
    first_order = sum(torch.dot(g.flatten(), s.double().flatten()).item() for g, s in zip(grad, step))
    with torch.no_grad():
        model.lm_head.weight += step[0].double()
    return exact_targets(model, tokenizer, questions)["token_mean"][0] - h0, first_order


def row(world: str, eta: float) -> dict:
    result, _ = swept(world)
    (found,) = [r for r in result.eta_sweep if r["eta"] == eta]
    return found


@pytest.mark.parametrize("eta", [1.0, 2.0])
def test_importance_sampled_change_matches_the_exact_change(eos_world, eta):
    exact, _ = exact_change(eos_world, eta)
    found = row(eos_world, eta)
    se = found["delta_h_true_se"]
    assert se <= 0.1 * abs(exact), f"no power: SE {se:.3g}, exact {exact:.3g}"
    assert abs(found["delta_h_true"] - exact) <= 3 * found["delta_h_true_se"]


def test_at_eta_zero_the_change_is_exactly_zero_with_every_response_counted(eos_world):
    found = row(eos_world, 0.0)
    assert found["delta_h_true"] == 0.0 and found["delta_h1"] == 0.0
    assert found["ess"] == len(EVALUATION_PROMPTS) * 4 and found["ess_on_E"] == len(PROMPTS) * 4 * 4


def test_the_exact_change_is_first_order_with_a_gap_growing_as_eta_squared(eos_world):
    (big, big_first), (small, small_first) = exact_change(eos_world, 0.5), exact_change(eos_world, 0.05)
    assert abs(small / small_first - 1) < abs(big / big_first - 1) < 0.2  # the ratio → 1 as η → 0
    assert (big - big_first) / (small - small_first) == pytest.approx(100, rel=0.15)  # (0.5 / 0.05)²


def test_the_model_is_bit_for_bit_unchanged_after_the_sweep(eos_world):
    _, probe = swept(eos_world)
    reference, _ = load_model_and_tokenizer(eos_world)
    for (name, param), (_, original) in zip(probe.processor.model.named_parameters(), reference.named_parameters()):
        assert torch.equal(param, original), name
