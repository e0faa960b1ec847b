"""Several processes with the trainer options that hold the U batch whole (entropy mask and bonus, truncated
completions masked, batch-scaled rewards): the counts of the whole batch are gathered, so two processes give
the one-process answer. Each run starts `train.py` as a user would."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from cli_helpers import ROOT, cli_args, results_file
from eos_world import save_eos_world

OPTIONS = (
    "--model.trainer.entropy_coef", "0.05", "--model.trainer.top_entropy_quantile", "0.5",
    "--model.trainer.mask_truncated_completions", "true", "--model.trainer.loss_type", "grpo",
    "--model.trainer.scale_rewards", "batch",
)  # fmt: skip


def predict(world, prompts_file, folder, devices: int) -> tuple[dict, pd.DataFrame]:
    """results.json and the token table of one run on `devices` processes (DDP on CPU, gloo)."""
    ddp = ["--data.batch_config.rollout_batch_size", "1", "--trainer.accelerator", "cpu",
           "--trainer.devices", str(devices), "--trainer.strategy", "ddp"]  # fmt: skip
    command = [sys.executable, "train.py", *cli_args(world, prompts_file, folder, "configs/sp.yaml", *ddp, *OPTIONS)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    path = results_file(folder)
    return json.loads(path.read_text()), pd.read_parquet(path.parent / "tokens_probe0.parquet")


@pytest.fixture(scope="module")
def eos_world(tmp_path_factory) -> str:
    """A world with EOS: lengths vary and some completions are truncated."""
    return save_eos_world(tmp_path_factory.mktemp("eos_world"))


def test_two_processes_give_the_one_process_answer_with_the_options(eos_world, prompts_file, tmp_path):
    (one, tokens1), (two, tokens2) = (predict(eos_world, prompts_file, tmp_path / f"devices{n}", n) for n in (1, 2))
    assert one["delta_h1"] != 0 and one["mixed_update_fraction"] > 0
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["trainer"]["top_entropy_quantile"] == {"value": 0.5, "source": "config"}
    for key in ("delta_h1", "delta_h1_se", "y_norm", "clip_factor"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    assert list(tokens2.token_id) == list(tokens1.token_id)
    scale = tokens1.contribution.abs().max()
    assert (tokens2.contribution - tokens1.contribution).abs().max() <= 1e-6 * scale
