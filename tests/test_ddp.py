"""Several processes (Lightning DDP on CPU, gloo): the same answer as one process, and a failing rank
stops every rank. Each test starts `train.py` as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from lightning.pytorch.strategies import FSDPStrategy

from probe_lightning.config import ProbeConfigError
from probe_lightning.distributed import check_strategy
from probe_lightning.results import token_selections

ROOT = Path(__file__).parents[1]


def predict(world, prompts_file, folder: Path, devices: int, *extra) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "train.py", "predict", "--config", "configs/sp.yaml", "--model.model", world,
        "--model.generation.max_new_tokens", "3", "--model.generation.stop_strings", "[]",
        "--data.source", "jsonl", "--data.path", prompts_file, "--data.B_E", "4", "--data.B_U", "4",
        "--data.batch_config.rollout_batch_size", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(folder),
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices), "--trainer.strategy", "ddp", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def outputs(folder: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    (path,) = folder.glob("**/results.json")
    return json.loads(path.read_text()), pd.read_parquet(path.parent / "responses_probe0.parquet"), pd.read_parquet(
        path.parent / "tokens_probe0.parquet"
    )


@pytest.fixture(scope="module")
def one_and_two(world, prompts_file, tmp_path_factory):
    runs = {}
    for devices in (1, 2):
        folder = tmp_path_factory.mktemp(f"devices{devices}")
        extra = ["--model.eta_sweep", "[0, 0.1]", "--model.top_contributions_se", "true"]
        done = predict(world, prompts_file, folder, devices, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[devices] = outputs(folder)
    return runs


def test_two_processes_give_the_one_process_answer(one_and_two):
    (one, _, _), (two, _, _) = one_and_two[1], one_and_two[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("delta_h1", "delta_h1_se", "x_norm", "y_norm", "reward_mean", "entropy_mean", "covariance"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    assert two["B_E"] == one["B_E"] == 4 and two["B_U"] == one["B_U"] == 4
    for got, expected in zip(two["eta_sweep"], one["eta_sweep"]):
        assert got["delta_h_true"] == pytest.approx(expected["delta_h_true"], rel=1e-6, abs=1e-12)
    probe1, probe2 = one["probes"][0], two["probes"][0]  # the standard errors of the counterfactuals and shares
    selections = token_selections(probe1["counterfactuals"])
    assert len(selections) == 5
    for name in selections:
        for key in ("delta_h1", "se", "removed_se"):
            assert probe2["counterfactuals"][name][key] == pytest.approx(probe1["counterfactuals"][name][key], rel=1e-6)
    assert probe2["block_shares_se"] == pytest.approx(probe1["block_shares_se"], rel=1e-6)
    for top in ("top_tokens", "top_responses"):
        assert [t["se"] for t in probe2[top]] == pytest.approx([t["se"] for t in probe1[top]], rel=1e-6)


def test_two_processes_sample_the_same_sequences_and_contributions(one_and_two):
    (_, responses1, tokens1), (_, responses2, tokens2) = one_and_two[1], one_and_two[2]
    assert list(responses2.key) == list(responses1.key) and list(responses2.response_text) == list(
        responses1.response_text
    )
    assert list(tokens2.token_id) == list(tokens1.token_id)
    scale = tokens1.contribution.abs().max()
    assert (tokens2.contribution - tokens1.contribution).abs().max() <= 1e-6 * scale
    assert (responses2.contribution - responses1.contribution).abs().max() <= 1e-6 * responses1.contribution.abs().max()


def test_repeated_probes_under_ddp(world, prompts_file, tmp_path):
    done = predict(world, prompts_file, tmp_path, 2, "--data.num_probes", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    results, _, _ = outputs(tmp_path)
    assert [p["probe_index"] for p in results["probes"]] == [0, 1] and results["world_size"] == 2
    assert (next(tmp_path.glob("**/tokens_probe1.parquet"))).exists()


def test_a_rank_that_fails_mid_probe_stops_every_rank_with_its_error(world, prompts_file, tmp_path):
    done = predict(
        world, prompts_file, tmp_path, 2, "--data.num_probes", "2", "--trainer.callbacks+=ddp_helpers.FailOnRank"
    )
    assert done.returncode != 0
    assert "rank 1 failed: RuntimeError: injected failure on rank 1 in probe 1" in done.stderr  # rank 0's error
    assert "[rank1]: RuntimeError: injected failure on rank 1 in probe 1" in done.stderr  # rank 1's own
    (path,) = tmp_path.glob("**/results.json")
    assert [p["probe_index"] for p in json.loads(path.read_text())["probes"]] == [0]  # probe 1 never claimed


def test_a_sharded_strategy_is_refused_naming_it_and_the_supported_ones():
    with pytest.raises(ProbeConfigError, match=r"trainer.strategy FSDPStrategy cannot .* supported: .*DDPStrategy"):
        check_strategy(FSDPStrategy())


def test_the_legacy_path_is_refused_on_several_processes(world, prompts_file, tmp_path):
    done = predict(world, prompts_file, tmp_path, 2, "--model.sampling.use_sequence_processor", "false")
    assert done.returncode != 0
    assert "legacy path) samples with torch's global generator, one process only" in done.stderr


def test_fewer_prompts_than_processes_is_refused_in_one_line(world, prompts_file, tmp_path):
    done = predict(world, prompts_file, tmp_path, 2, "--data.B_U", "1")
    assert done.returncode != 0 and "error: data.B_U = 1 < 2 processes" in done.stderr
