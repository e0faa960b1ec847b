"""Sequential sampling (data.target_rse, sequential.py): a probe draws more prompts until SE / |δH₁| <= the target.

- under the stopping rule, δH₁ ± 1.96 SE still covers the exact δH₁ of the enumerable world 90–99% of the time;
- a sequential probe's δH₁ and SE are those of a fixed probe of its final prompts;
- on the command line: the stages and the stop reason in results.json, disjoint prompts, and one-line refusals.
"""

import json
import logging
import random
from dataclasses import replace

import pytest
from cli_helpers import cli_args, results_file
from enumerable_world import PROMPTS
from probe_helpers import make_probe, prompt_batches
from test_unbiasedness import exact_world

import train
from probe_lightning.sequential import SequentialSampling

log = logging.getLogger(__name__)
PILOT = PROMPTS * 2  # each probe starts at B_E = B_U = 8
TARGET_RSE, MAX_PROMPTS, NUM_PROBES = 0.6, 128, 200


class UniformPrompts:
    """more_prompts for a Probe: n_E and n_U prompts drawn uniformly from the world's, each with a new prompt id
    (so new responses); `drawn` keeps probe k's, in order."""

    def __init__(self):
        self.drawn: dict[int, list] = {}

    def __call__(self, k: int, n_E: int, n_U: int):
        drawn = self.drawn.setdefault(k, [])
        rng = random.Random(f"{k}/{len(drawn)}")
        entropy, update = [rng.choice(PROMPTS) for _ in range(n_E)], [rng.choice(PROMPTS) for _ in range(n_U)]
        start = 1000 * (len(drawn) + 1)
        batches = [
            replace(batch, last_in_probe=False, prompt_ids=[start + i for i in batch.prompt_ids])
            for batch in prompt_batches(k, entropy, update, rollout_batch_size=256)
        ]
        drawn.extend(batches)
        return batches


def sequential_probe(world, target_rse=TARGET_RSE, max_prompts=MAX_PROMPTS, breakdown_se=False):
    probe = make_probe(world, G_E=4, entropy_target="dr_grpo", standard_error=True, breakdown_se=breakdown_se)
    probe.sequential, probe.more_prompts = SequentialSampling(target_rse, max_prompts), UniformPrompts()
    return probe


def run(probe, k):
    for batch in prompt_batches(k, PILOT, PILOT, rollout_batch_size=256):
        output = probe.step(batch)
    return output.finished


@pytest.mark.usefixtures("one_thread")
def test_sequential_intervals_cover_the_exact_value_90_to_99_percent_of_the_time(world):
    exact, _, _ = exact_world(world, G=4)
    probe = sequential_probe(world)
    results = [run(probe, k) for k in range(NUM_PROBES)]
    covered = sum(abs(r.delta_h1 - exact) <= 1.96 * r.delta_h1_se for r in results) / len(results)
    stops = [r.sequential["stopped"] for r in results]
    reached = stops.count("target reached") / len(results)
    stages = sum(len(r.sequential["stages"]) for r in results) / len(results)
    log.info("coverage %.3f over %d sequential probes; %.0f%% reached SE <= %.2f |δH₁|, %.1f stages on average",
             covered, len(results), 100 * reached, TARGET_RSE, stages)  # fmt: skip
    assert 0.90 <= covered <= 0.99, f"coverage {covered:.3f} over {len(results)} probes"
    assert reached >= 0.3 and stages > 1.5  # the rule did act: probes grew, and many stopped at the target
    assert results[0].counterfactuals == {} and results[0].block_shares_se is None  # breakdown_se false: δH₁ only
    for r in results:
        assert r.B_E + r.B_U <= MAX_PROMPTS
        if r.sequential["stopped"] == "target reached":
            assert r.delta_h1_se <= TARGET_RSE * abs(r.delta_h1)


def test_a_sequential_probe_is_the_fixed_probe_of_its_final_prompts(world):
    probe = sequential_probe(world, target_rse=0.05, max_prompts=64, breakdown_se=True)  # grows to max_prompts
    result = run(probe, 0)
    stages = result.sequential["stages"]
    assert len(stages) >= 2 and result.sequential["stopped"] == "max_prompts reached"
    assert [(s["B_E"], s["B_U"]) for s in stages][0] == (8, 8) and result.B_E + result.B_U <= 64
    fixed = make_probe(world, G_E=4, entropy_target="dr_grpo", standard_error=True)
    pilot = prompt_batches(0, PILOT, PILOT, rollout_batch_size=256)
    extra = probe.more_prompts.drawn[0]
    batches = [b for b in pilot + extra if b.role == "E"] + [b for b in pilot + extra if b.role == "U"]
    for batch in batches[:-1]:
        fixed.step(replace(batch, last_in_probe=False))
    same = fixed.step(replace(batches[-1], last_in_probe=True)).finished
    assert (same.B_E, same.B_U) == (result.B_E, result.B_U)
    assert same.delta_h1 == pytest.approx(result.delta_h1, rel=1e-5)
    assert same.delta_h1_se == pytest.approx(result.delta_h1_se, rel=1e-5)
    # the counterfactuals' and shares' SEs, taken once at the final sizes, are the fixed probe's too
    assert result.counterfactuals.keys() == same.counterfactuals.keys() and len(result.counterfactuals) == 5
    for name, entry in same.counterfactuals.items():
        assert result.counterfactuals[name]["se"] == pytest.approx(entry["se"], rel=1e-5), name
    assert result.block_shares_se == pytest.approx(same.block_shares_se, rel=1e-5)


def test_target_rse_on_the_command_line_records_its_stages_and_draws_disjoint_prompts(
    world, prompts_file, tmp_path, caplog
):
    with caplog.at_level("INFO"):
        train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", "--data.target_rse", "0.2",
                            "--data.max_prompts", "24"))  # fmt: skip
    results = json.loads(results_file(tmp_path).read_text())
    probe = results["probes"][0]
    record = probe["sequential"]
    assert record["target_rse"] == 0.2 and record["stages"][0]["B_E"] == 4 and record["stages"][0]["B_U"] == 4
    assert record["stopped"] in ("target reached", "max_prompts reached", "no unused prompts left")
    assert (probe["B_E"], probe["B_U"]) == (record["stages"][-1]["B_E"], record["stages"][-1]["B_U"])
    assert probe["B_E"] + probe["B_U"] <= 24
    assert len(record["stages"]) >= 2 or record["stopped"] == "target reached"
    assert f"{len(record['stages'])} stages" in caplog.text and record["stopped"] in caplog.text
    entropy, update = set(probe["entropy_prompt_contributions"]), set(probe["update_prompt_contributions"])
    assert len(entropy) == probe["B_E"] and len(update) == probe["B_U"] and not entropy & update


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.standard_error", "false"], "stops on the standard error"),
        (["--model.trainer.top_entropy_quantile", "0.5"], "is not supported"),
        (["--data.rollouts", "nowhere"], "data.rollouts"),
        (["--data.max_prompts", "4"], "data.max_prompts = 4 < data.B_E + data.B_U = 8"),
        (["--data.save_rollouts", "true"], "would save the first stage's rollouts only"),
    ],
)
def test_target_rse_refuses_what_it_cannot_do_in_one_line(world, prompts_file, tmp_path, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", "--data.target_rse", "0.3", *extra))
    text = str(exit_info.value.code)
    assert "\n" not in text and message in text
