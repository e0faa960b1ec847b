"""The estimator functions of docs/math.md on hand-computable inputs."""

import math

import pytest
import torch

from probe_lightning import estimators
from probe_lightning.estimators import resolved, sizes_for_target
from probe_lightning.trainer_loss import advantages


def test_advantages_without_scaling_subtract_the_group_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]])
    assert torch.equal(advantages(rewards, "none"), expected)


def test_still_to_come_sums_the_later_positions_only():
    values = torch.tensor([[[1.0, 2.0, 3.0, 0.0]]])
    assert torch.equal(estimators.still_to_come(values), torch.tensor([[[5.0, 3.0, 0.0, 0.0]]]))


def test_loo_mean_is_the_other_responses_mean_and_zero_alone():
    values = torch.tensor([[1.0, 2.0, 6.0]])
    assert torch.equal(estimators.loo_mean(values), torch.tensor([[4.0, 3.5, 1.5]]))
    assert torch.equal(estimators.loo_mean(values[:, :1]), torch.zeros(1, 1))


def test_loo_coefficient_subtracts_the_mean_of_the_other_responses():
    weighted = torch.tensor([[-1.0, -2.0, -6.0]])
    # c_0 = -1 - (-2 - 6)/2 = 3, c_1 = -2 - (-1 - 6)/2 = 1.5, c_2 = -6 - (-1 - 2)/2 = -4.5
    assert torch.equal(estimators.loo_coefficients(weighted), torch.tensor([[3.0, 1.5, -4.5]]))


def test_loo_coefficient_with_one_response_has_no_baseline():
    weighted = torch.tensor([[-1.5], [-0.5]])
    assert torch.equal(estimators.loo_coefficients(weighted), weighted)


def test_sequence_targets_divide_by_their_normaliser():
    seq_logprobs = torch.tensor([[-4.0, -6.0]])
    gen_lens = torch.tensor([[2.0, 3.0]])
    max_lengths = torch.tensor([3.0])
    weighted = lambda mode: estimators.weighted_logprobs(seq_logprobs, gen_lens, max_lengths, mode, budget=8)  # noqa: E731
    assert torch.allclose(weighted("dr_grpo"), torch.tensor([[-4 / 3, -2.0]]))
    assert torch.allclose(weighted("per_token_avg"), torch.tensor([[-2.0, -2.0]]))
    assert torch.allclose(weighted("budget"), torch.tensor([[-0.5, -0.75]]))
    with pytest.raises(ValueError, match="entropy_target must be dr_grpo, per_token_avg or budget"):
        weighted("mean")


def _grad(loss, theta):
    return torch.autograd.grad(loss.sum(), theta)[0]


def test_entropy_loss_gradient_is_minus_mean_of_coefficient_times_score():
    # S_g(θ) = a_g · θ, so ∇S_g = a_g and X = -(1/G) Σ c_g a_g with c the detached LOO coefficients.
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    a = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.5, -3.0]])
    seq_logprobs = (a @ theta - 2.0)[None, :]  # [1, 3]
    gen_lens, max_lengths = torch.tensor([[2.0, 4.0, 4.0]]), torch.tensor([4.0])
    x = _grad(estimators.entropy_loss(seq_logprobs, gen_lens, max_lengths, "dr_grpo", budget=8), theta)
    c = estimators.loo_coefficients(seq_logprobs.detach() / 4.0)[0]
    assert torch.allclose(x, -(c[:, None] * a).mean(0))


def test_per_token_avg_adds_the_pathwise_term():
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    a = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    seq_logprobs = (a @ theta - 2.0)[None, :]
    gen_lens, max_lengths = torch.tensor([[2.0, 4.0]]), torch.tensor([4.0])
    x = _grad(estimators.entropy_loss(seq_logprobs, gen_lens, max_lengths, "per_token_avg", budget=8), theta)
    weighted = seq_logprobs.detach() / gen_lens
    c = estimators.loo_coefficients(weighted)[0]
    pathwise = -(a / gen_lens[0][:, None]).mean(0)
    assert torch.allclose(x, -(c[:, None] * a).mean(0) + pathwise)


def test_update_loss_gradient_is_mean_advantage_over_max_length_times_score():
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    a = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    seq_logprobs = (a @ theta)[None, :]
    adv = torch.tensor([[0.5, -0.5]])
    grad = _grad(estimators.update_loss(seq_logprobs, adv, torch.tensor([5.0])), theta)
    assert torch.allclose(grad, (0.5 * a[0] - 0.5 * a[1]) / 5.0 / 2)


def test_dot_accumulates_in_float64():
    big = [torch.full((1000,), 1e4, dtype=torch.float32), torch.tensor([1.0])]
    ones = [torch.ones(1000), torch.tensor([1e-3])]
    assert estimators.dot(big, ones) == pytest.approx(1e7 + 1e-3, rel=0, abs=1e-9)
    assert estimators.norm([torch.tensor([3.0, 4.0])]) == 5.0


def test_plugin_standard_error_follows_the_formula():
    a_e = torch.tensor([1.0, 2.0, 3.0, 4.0])  # var 5/3
    b_u = torch.tensor([0.0, 2.0])  # var 2
    expected = 0.1 * math.sqrt((5 / 3) / 4 + 2 / 2)
    assert estimators.plugin_standard_error(a_e, b_u, 0.1) == pytest.approx(expected)
    assert math.isnan(estimators.plugin_standard_error(a_e, b_u[:1], 0.1))


def test_standard_error_parts_are_the_two_terms_of_the_plugin_se():
    a_e, b_u = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0])
    parts = estimators.standard_error_parts(a_e, b_u, 0.1)
    assert parts == pytest.approx({"E": 0.1 * math.sqrt((5 / 3) / 4), "U": 0.1 * math.sqrt(2 / 2)})
    assert math.hypot(parts["E"], parts["U"]) == pytest.approx(estimators.plugin_standard_error(a_e, b_u, 0.1))


def test_dot64_is_float64_accurate_without_float64_copies():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(1_000_003, generator=generator), torch.randn(1_000_003, generator=generator)
    exact = torch.dot(x.double(), y.double()).item()
    # a float32 torch.dot is 4e-9 |x||y| off here
    assert abs(estimators.dot64(x, y) - exact) <= 1e-10 * x.norm().item() * y.norm().item()
    assert estimators.dot64(x.double(), y.double()) == pytest.approx(exact, rel=1e-14)
    bf16_exact = torch.dot(x.bfloat16().double(), y.double()).item()
    assert estimators.dot64(x.bfloat16(), y) == pytest.approx(bf16_exact, rel=1e-6)


@pytest.mark.parametrize("parts, costs", [((3.0, 1.0), (1.0, 1.0)), ((1.0, 2.0), (0.2, 3.0)), ((0.5, 0.5), (5.0, 1.0))])
def test_sizes_for_target_are_the_cheapest_pair_that_reaches_the_target(parts, costs):
    """Against a brute-force search over every integer (B_E, B_U): the returned pair reaches SE <= |δH₁|/3 and
    costs no more than the cheapest pair that does, rounding to integers aside (one prompt of each side)."""
    delta_h1, sizes = -0.4, {"E": 8, "U": 8}
    se_parts, cost = dict(zip("EU", parts)), dict(zip("EU", costs))
    v = {role: se_parts[role] ** 2 * sizes[role] for role in "EU"}  # per-prompt variances
    target = (delta_h1 / 3) ** 2
    found = sizes_for_target(delta_h1, se_parts, sizes, cost)
    assert v["E"] / found["B_E"] + v["U"] / found["B_U"] <= target * (1 + 1e-12)
    seconds = cost["E"] * found["B_E"] + cost["U"] * found["B_U"]
    assert found["seconds"] == pytest.approx(seconds)
    b_e = torch.arange(2, 100_000, dtype=torch.float64)
    room = target - v["E"] / b_e  # what B_E leaves for the U side's variance
    b_u = (v["U"] / room[room > 0]).ceil().clamp(min=2)  # the fewest U prompts that fit in it
    cheapest = (cost["E"] * b_e[room > 0] + cost["U"] * b_u).min().item()
    assert cheapest <= seconds <= cheapest + cost["E"] + cost["U"]


def test_sizes_for_target_without_costs_or_a_second_prompt():
    found = sizes_for_target(0.1, {"E": 0.1, "U": 0.1}, {"E": 4, "U": 4}, {})
    assert found["B_E"] == found["B_U"] and found["seconds"] is None  # equal costs: equal variances, equal sizes
    assert sizes_for_target(0.1, {"E": float("nan"), "U": 0.1}, {"E": 1, "U": 4}, {}) is None
    assert sizes_for_target(0.0, {"E": 0.1, "U": 0.1}, {"E": 4, "U": 4}, {}) is None


def test_resolved_is_two_standard_errors_from_zero():
    assert resolved(-0.3, 0.1) and not resolved(0.19, 0.1)
    assert resolved(1.0, None) is None and resolved(1.0, float("nan")) is None
