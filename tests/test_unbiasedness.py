"""The probe against exact answers in the enumerable world (tests/enumerable_world.py).

Every probe here runs the Probe's own step (what predict_step calls); only the ground truth is
computed independently, by summing over all V**T responses.
"""

import functools
import logging
from dataclasses import replace

import pytest
import torch
from enumerable_world import PROMPTS, exact_delta_h1, exact_prompt
from probe_helpers import make_probe, prompt_batches, run_probes, z_score

from probe_lightning.accumulator import ProbeSums
from probe_lightning.probe import Probe

# Same prompts in E and U (their responses are sampled independently); only the output layer is
# trainable, which keeps the noise of ⟨X̄, Ȳ⟩ low enough for tests with power. Without a baseline
# (G_E = 1) X is much noisier: that design takes many prompts with one response each.
ENTROPY_PROMPTS = {4: PROMPTS * 8, 1: PROMPTS * 96}
UPDATE_PROMPTS = PROMPTS * 12
NUM_PROBES = {4: 200, 1: 300}
log = logging.getLogger(__name__)  # the measured numbers: pytest --log-cli-level=INFO
pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def exact_world(world: str, G: int):
    probe = make_probe(world)
    tokenizer = probe.processor.tokenizer
    exact = [exact_prompt(probe.processor.model, tokenizer, p) for p in PROMPTS]
    return exact_delta_h1(exact, exact, G, 1.0)  # E and U repeat PROMPTS evenly: the same means


@functools.cache
def probes(world: str, entropy_target: str, G_E: int, standard_error: bool = False):
    """Without the standard error unless asked: its E pass holds one prompt per forward (384 with G_E = 1)."""
    probe = make_probe(world, G_E=G_E, entropy_target=entropy_target, standard_error=standard_error, breakdown_se=False)
    return run_probes(probe, NUM_PROBES[G_E], ENTROPY_PROMPTS[G_E], UPDATE_PROMPTS, seed=1234)


def project(vectors: list[list[torch.Tensor]], directions: list[torch.Tensor]) -> torch.Tensor:
    """[num_probes, num_directions] projections of flattened parameter vectors."""
    flat = torch.stack([torch.cat([v.flatten() for v in vector]) for vector in vectors])
    return flat @ torch.stack(directions).T


# With fixed-length responses dr_grpo and budget are the same estimator (L_max = max_new_tokens = T),
# so dr_grpo, the seed's target, runs once.
@pytest.mark.parametrize(
    ("entropy_target", "G_E"),
    [("budget", 1), ("budget", 4), ("per_token_avg", 1), ("per_token_avg", 4), ("dr_grpo", 4)],
)
def test_delta_h1_is_unbiased(world, entropy_target, G_E):
    exact, _, _ = exact_world(world, G=4)
    results, _, _ = probes(world, entropy_target, G_E)
    values = torch.tensor([r.delta_h1 for r in results], dtype=torch.float64)
    z, se = z_score(values, exact)
    log.info("%s G_E=%d: exact δH₁ %.5g, mean %.5g ± %.2g over %d probes (z=%.2f)",
             entropy_target, G_E, exact, values.mean(), se, len(values), z)  # fmt: skip
    assert se < 0.1 * abs(exact), f"the test has no power: SE {se:.3g} vs exact {exact:.3g}"
    assert z < 3, f"mean {values.mean():.5g} vs exact {exact:.5g}: {z:.2f} SE apart"


@pytest.mark.parametrize("G_E", [1, 4])
@pytest.mark.parametrize("entropy_target", ["budget", "per_token_avg"])
def test_x_bar_and_y_bar_are_unbiased_along_fixed_directions(world, entropy_target, G_E):
    """E[X̄] = ∇H̄ and E[Ȳ] = (1 - 1/G) ∇E[r]/T: z-tests along the exact vector (where a wrong factor
    or sign shows most, and the test must have power) and along two random directions."""
    _, grad_h, expected_y = exact_world(world, G=4)
    _, x_bars, y_bars = probes(world, entropy_target, G_E)
    generator = torch.Generator().manual_seed(0)
    size = sum(g.numel() for g in grad_h)
    random_directions = [torch.randn(size, generator=generator, dtype=torch.float64) for _ in range(2)]
    for estimates, exact in ((x_bars, grad_h), (y_bars, expected_y)):
        exact_flat = torch.cat([e.flatten() for e in exact])
        directions = [exact_flat / exact_flat.norm(), *random_directions]
        projections = project(estimates, directions)
        exact_projections = project([exact], directions)[0]
        for i, (column, target) in enumerate(zip(projections.T, exact_projections)):
            z, se = z_score(column, target.item())
            if i == 0:
                assert se < 0.1 * abs(target.item()), f"no power: SE {se:.3g} vs {target:.3g}"
            assert z < 3.5, f"direction {i}: mean {column.mean():.5g} vs exact {target:.5g}: {z:.2f} SE apart"


def test_standard_error_intervals_cover_the_exact_value_95_percent_of_the_time(world):
    exact, _, _ = exact_world(world, G=4)
    results, _, _ = probes(world, "dr_grpo", 4, standard_error=True)
    covered = [abs(r.delta_h1 - exact) <= 1.96 * r.delta_h1_se for r in results]
    coverage = sum(covered) / len(covered)
    log.info("95%% intervals covered the exact δH₁ in %.3f of %d probes", coverage, len(covered))
    assert 0.90 <= coverage <= 0.99, f"coverage {coverage:.3f} over {len(covered)} probes"


def test_update_prompt_contributions_sum_to_delta_h1(world):
    results, _, _ = probes(world, "dr_grpo", 4, standard_error=True)
    for result in results[:10]:
        contributions = result.update_prompt_contributions.values()
        assert len(contributions) == len(UPDATE_PROMPTS)
        # Exact in real arithmetic; float32 forward-mode against float32 gradients in practice.
        assert abs(sum(contributions) - result.delta_h1) <= 1e-5 * sum(abs(c) for c in contributions)


def _rollouts(probe: Probe, seed: int = 7):
    batches = prompt_batches(0, PROMPTS * 2, PROMPTS * 2, rollout_batch_size=8, seed=seed)
    return [probe.make_rollout(batch) for batch in batches]


def _sums(probe: Probe, rollouts) -> list[torch.Tensor]:
    probe.sums = ProbeSums(probe.named_params)
    for rollout in rollouts:
        probe.accumulate(rollout)
    return [torch.cat([s.flatten() for s in probe.sums.sum_x]), torch.cat([s.flatten() for s in probe.sums.sum_y])]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _per_sample_sums(probe: Probe, rollouts) -> list[torch.Tensor]:
    """ΣX and ΣY by autograd of each response's own S(y), in float64, one response at a time."""
    model = probe.processor.model.double()
    params = [p for p in model.parameters() if p.requires_grad]
    sums = {"E": [torch.zeros_like(p) for p in params], "U": [torch.zeros_like(p) for p in params]}
    try:
        for rollout in rollouts:
            batch, P = rollout.batch, rollout.batch.prompt_len
            for b in range(batch.num_prompts):
                G = batch.num_responses_per_prompt
                scores, grads = [], []
                for g in range(G):
                    mask = batch.attention_masks[b, g]
                    ids = batch.sequences[b, g][mask.bool()]
                    prompt_tokens = int(mask[:P].sum())
                    logits = model(input_ids=ids[None]).logits[0, prompt_tokens - 1 : -1]
                    s = logits.log_softmax(-1).gather(-1, ids[prompt_tokens:, None]).sum()
                    scores.append(s.item())
                    grads.append(torch.autograd.grad(s, params))
                scores = torch.tensor(scores, dtype=torch.float64)
                if rollout.role == "E":  # fixed length: S_w = S / T in every mode
                    weighted = scores / 3
                    baseline = (weighted.sum() - weighted) / (G - 1)
                    weights = -(weighted - baseline) / G
                else:
                    weights = rollout.advantages[b].double() / rollout.max_lengths[b].double() / G
                for total, *per_response in zip(sums[rollout.role], *grads):
                    total += sum(w * grad for w, grad in zip(weights, per_response))
    finally:
        model.float()
    return [torch.cat([s.flatten() for s in sums[role]]) for role in ("E", "U")]


def test_sums_equal_per_sample_autograd_on_fixed_samples(world):
    probe = make_probe(world)
    rollouts = _rollouts(probe)
    assert any(r.rewards.sum() > 0 for r in rollouts if r.role == "U"), "no reward: ΣY would be 0"
    for probe_sum, reference in zip(_sums(probe, rollouts), _per_sample_sums(probe, rollouts)):
        assert reference.norm() > 0
        assert _relative_error(probe_sum, reference) < 1e-6


def test_sums_do_not_depend_on_microbatches_rollout_batches_or_left_padding(world):
    probe = make_probe(world)
    rollouts = _rollouts(probe)
    reference = _sums(probe, rollouts)
    one_prompt_microbatches = _sums(make_probe(world, tf_batch_size=4), rollouts)
    halves = [half for r in rollouts for half in (r.select(slice(0, 3)), r.select(slice(3, None)))]
    more_padding = [replace(r, batch=r.batch.left_padded(5)) for r in rollouts]
    for variant in (one_prompt_microbatches, _sums(probe, halves), _sums(probe, more_padding)):
        for got, expected in zip(variant, reference):
            assert _relative_error(got, expected) < 1e-6


def test_exact_entropy_change_matches_delta_h1_to_first_order(world):
    """ΔH(η) - δH₁(η) shrinks like η² in the exact world: the probe's target is the right derivative."""
    probe = make_probe(world)
    tokenizer = probe.processor.tokenizer
    exact, grad_h, expected_y = exact_world(world, G=4)
    trainable = [p for _, p in probe.named_params]
    original = [p.detach().clone() for p in trainable]

    def mean_entropy() -> float:
        return sum(exact_prompt(probe.processor.model, tokenizer, p).entropy for p in PROMPTS) / len(PROMPTS)

    h0 = mean_entropy()
    gaps = []
    for eta in (0.1, 0.05):
        with torch.no_grad():
            for param, start, step in zip(trainable, original, expected_y):
                param.copy_(start + eta * step.float())
        gaps.append(mean_entropy() - h0 - eta * exact)
    with torch.no_grad():
        for param, start in zip(trainable, original):
            param.copy_(start)
    assert abs(gaps[1]) < 0.05 * abs(0.05 * exact), "at η = 0.05 the first-order term should dominate"
    assert gaps[0] / gaps[1] == pytest.approx(4, rel=0.15), f"gap ratio {gaps[0] / gaps[1]:.2f}, expected ~4 (η²)"


def test_update_batch_with_one_response_per_prompt_gives_zero(world):
    probe = make_probe(world, G=1)
    results, _, _ = run_probes(probe, 1, ENTROPY_PROMPTS[4], UPDATE_PROMPTS)
    assert results[0].delta_h1 == 0.0
    assert any("G = 1" in note for note in probe.results.info.notes)


def test_a_probe_without_mixed_outcomes_says_its_number_is_empty(world):
    probe = make_probe(world, G=1)
    run_probes(probe, 1, PROMPTS, PROMPTS)
    results = probe.results.to_dict()
    assert results["mixed_update_fraction"] == 0.0
    assert "every advantage is 0" in results["empty"] and "larger G" in results["empty"]


def test_mixed_update_fraction_counts_prompts_whose_rewards_differ(world):
    probe = make_probe(world)
    batches = prompt_batches(0, PROMPTS, PROMPTS * 3, rollout_batch_size=256, seed=3)
    outputs = [probe.step(batch) for batch in batches]
    rewards = outputs[-1].rollout.rewards
    expected = (rewards.amax(1) > rewards.amin(1)).float().mean().item()
    assert 0 < outputs[-1].finished.mixed_update_fraction == pytest.approx(expected)
    assert "empty" not in probe.results.to_dict()
