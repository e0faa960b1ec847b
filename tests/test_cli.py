"""The command line and the Lightning plumbing: configs, results.json, loggers, callbacks, bad input."""

import json
import re
import subprocess
import sys

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from cli_helpers import ROOT, CrashAtProbe, cli_args, probe_and_data, results_file
from lightning.pytorch.loggers import CSVLogger

import train
from callbacks import BatchInvariants, DeltaH1Logger, MemoryMonitor

TENSORBOARD = ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir"]
RESULT_KEYS = {
    "delta_h1", "bars_dot", "learning_rate", "B_E", "B_U", "G", "x_norm", "y_norm", "preconditioner",
    "use_sequence_processor", "reward_mean", "entropy_mean", "timings", "probes", "delta_h1_se",
}


@pytest.mark.parametrize("config", ["configs/sp.yaml", "configs/legacy.yaml"])
def test_predict_writes_results_json_and_logs_delta_h1(world, prompts_file, tmp_path, config):
    train.main(cli_args(world, prompts_file, tmp_path, config))
    results = json.loads(results_file(tmp_path).read_text())
    assert RESULT_KEYS <= results.keys()
    assert results["use_sequence_processor"] == (config == "configs/sp.yaml")
    assert results["preconditioner"] == "identity" and results["B_E"] == 4 and results["B_U"] == 4
    assert '"B_E": 4,' in results_file(tmp_path).read_text()  # an integer stays one, not 4.0
    assert results["delta_h1"] == pytest.approx(results["learning_rate"] * results["bars_dot"])
    assert {"generate", "teacher_force_x", "teacher_force_y"} <= results["timings"].keys()
    assert any(key.startswith("peak_rss_mib") for key in results["memory"])
    metrics = (results_file(tmp_path).parent / "metrics.csv").read_text()
    assert "probe/delta_h1" in metrics and "memory/peak_rss_mib_E_batches" in metrics


def test_the_printed_line_names_the_target_and_says_when_the_number_is_empty(world, prompts_file, tmp_path, caplog):
    with caplog.at_level("INFO"):
        train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", "--model.G", "1"))
    (line,) = [r.message for r in caplog.records if r.message.startswith("δH₁ = ")]
    assert "for the token_mean entropy" in line and "mixed U prompts: 0%" in line and "[empty: " in line
    results = json.loads(results_file(tmp_path).read_text())
    assert results["trainer"]["loss_type"] == {"value": "dapo", "source": "default"}
    assert results["trainer"]["num_generations"] == {"value": 1, "source": "config"}
    assert (results["entropy_target"], results["estimator"], results["update"]) == ("token_mean", "rb", "identity")


def test_an_eta_sweep_writes_its_rows_a_plot_and_tensorboard_figures(world, prompts_file, tmp_path):
    train.main(
        cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", "--model.eta_sweep", "[0, 0.01, 0.1]")
        + [*TENSORBOARD, str(tmp_path)]
    )
    results = json.loads(results_file(tmp_path).read_text())
    rows = results["eta_sweep"]
    assert [row["eta"] for row in rows] == [0, 0.01, 0.1]
    assert rows[0]["delta_h_true"] == 0 and rows[0]["ess"] == 4 * 4  # B_V = B_E = 4 prompts, G_E = G = 4
    assert {"delta_h1", "delta_h_true_se", "ratio", "covariance_proxy", "delta_h_true_on_E"} <= rows[1].keys()
    assert {"noise_floor", "linear_limit_eta", "slope"} <= results["eta_sweep_summary"].keys()
    assert results["timings"]["eta_sweep"] > 0
    assert (results_file(tmp_path).parent / "eta_sweep_probe0.png").stat().st_size > 10_000
    events = list(tmp_path.glob("**/events.out.tfevents.*"))
    assert events and any(b"eta_sweep" in path.read_bytes() for path in events)


def test_a_tensorboard_logger_attached_on_the_command_line_gets_the_metrics(world, prompts_file, tmp_path):
    train.main(
        cli_args(world, prompts_file, tmp_path)
        + [*TENSORBOARD, str(tmp_path)]
    )
    assert list(tmp_path.glob("**/events.out.tfevents.*"))
    assert results_file(tmp_path).exists()


def _trainer(tmp_path, *callbacks) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", inference_mode=False, logger=CSVLogger(tmp_path), enable_progress_bar=False,
        callbacks=[BatchInvariants(), DeltaH1Logger(), MemoryMonitor(), *callbacks],
    )  # fmt: skip




def test_repeated_probes_give_one_row_each_and_their_mean(world, prompts_file, tmp_path):
    probe, data = probe_and_data(world, prompts_file, num_probes=3)
    _trainer(tmp_path).predict(probe, datamodule=data, return_predictions=False)
    results = json.loads(results_file(tmp_path).read_text())
    rows = results["probes"]
    assert [row["probe_index"] for row in rows] == [0, 1, 2]
    assert len({row["delta_h1"] for row in rows}) == 3, "independent probes give different values"
    assert results["delta_h1"] == pytest.approx(sum(row["delta_h1"] for row in rows) / 3)
    assert results["delta_h1_mean_se"] > 0 and results["num_probes"] == 3
    for k, row in enumerate(rows):  # one table per probe, written when it ends: one probe's rows in memory
        tokens = pd.read_parquet(results_file(tmp_path).parent / f"tokens_probe{k}.parquet")
        assert set(tokens.probe) == {k}
        assert tokens[tokens.role == "U"].contribution.sum() == pytest.approx(row["delta_h1"], rel=1e-4)


def test_a_crash_keeps_the_probes_that_finished(world, prompts_file, tmp_path):
    probe, data = probe_and_data(world, prompts_file, num_probes=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path, CrashAtProbe(2)).predict(probe, datamodule=data, return_predictions=False)
    rows = json.loads(results_file(tmp_path).read_text())["probes"]
    assert [row["probe_index"] for row in rows] == [0, 1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.B_E", "0"], "data.B_E must be >= 1, got 0"),
        (["--data.batch_config.rollout_batch_size", "0"], "batch_config.rollout_batch_size must be >= 1, got 0"),
        (["--model.G", "0"], "model.G must be >= 1, got 0"),
        (["--model.generation.top_p", "1.5"], r"generation.top_p must be in \(0, 1\], got 1.5"),
        (["--model.generation.temperature", "0"], "generation.temperature must be > 0, got 0"),
        (["--data.path", "/nonexistent/x.jsonl"], "data.path.*/nonexistent/x.jsonl"),
        (["--model.optimizer_state", "/nonexistent/opt.pt"], "model.optimizer_state: no such file"),
        (["--trainer.inference_mode", "true"], "trainer.inference_mode: false"),
    ],
)
def test_bad_input_stops_with_a_one_line_error_naming_the_field(world, prompts_file, tmp_path, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", *extra))
    text = str(exit_info.value.code)
    assert "\n" not in text
    assert text.startswith("error: ")
    assert re.search(message, text), text


def test_a_prompt_longer_than_the_context_is_refused(world, tmp_path):
    long_file = tmp_path / "long.jsonl"
    long_file.write_text("\n".join(json.dumps({"question": "1 " * 70, "answer": "1"}) for _ in range(8)) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(cli_args(world, str(long_file), tmp_path))
    assert "model's context of 64 tokens" in str(exit_info.value.code)


def test_an_optimizer_state_that_does_not_fit_the_model_is_refused(world, prompts_file, tmp_path):
    state_path = tmp_path / "opt.pt"
    params = [torch.nn.Parameter(torch.zeros(3, 3))]
    optimizer = torch.optim.AdamW(params)
    params[0].grad = torch.ones(3, 3)
    optimizer.step()
    torch.save(optimizer.state_dict(), state_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(
            cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", "--model.optimizer_state", str(state_path))
        )
    assert "has 1 entries" in str(exit_info.value.code) and "trainable parameters" in str(exit_info.value.code)


@pytest.mark.parametrize(
    ("flag", "allowed"),
    [
        ("--model.update", ["identity", "adam_precondition", "adamw_step"]),
        ("--model.entropy_target", ["token_mean", "budget", "per_token_avg", "dr_grpo"]),
        ("--model.trainer.loss_type", ["seed", "grpo", "bnpo", "dr_grpo", "dapo"]),
        ("--data.source", ["arithmetic", "jsonl", "hf"]),
    ],
)
def test_a_choice_outside_its_allowed_set_is_refused_with_the_set(world, prompts_file, tmp_path, capsys, flag, allowed):
    with pytest.raises(SystemExit) as exit_info:
        train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", flag, "bogus"))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "bogus" in err and all(value in err for value in allowed), err


def test_help_lists_the_allowed_values_of_each_choice():
    out = subprocess.run(
        [sys.executable, "train.py", "predict", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    text = " ".join(out.split())  # argparse wraps long lines
    assert "Literal['identity', 'adam_precondition', 'adamw_step']" in text
    assert "--model.entropy_target {token_mean,budget,per_token_avg,dr_grpo}" in text


def test_print_config_shows_the_seed_keys():
    out = subprocess.run(
        [sys.executable, "train.py", "predict", "--config", "configs/sp.yaml", "--print_config"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for key in ("use_sequence_processor:", "top_p:", "temperature:", "max_new_tokens:", "gen_batch_size:",
                "tf_batch_size:", "rollout_batch_size:", "B_E:", "B_U:", "G:", "learning_rate:",
                "entropy_target:", "estimator:", "loss_type:", "optimizer_state:",
                "inference_mode: false"):  # fmt: skip
        assert key in out


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_lightning_precision_flags_work_unchanged(world, prompts_file, tmp_path, precision):
    train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", "--trainer.precision", precision))
    results = json.loads(results_file(tmp_path).read_text())
    assert results["x_norm"] > 0 and torch.isfinite(torch.tensor(results["delta_h1"]))


def test_a_run_writes_the_sample_tables_the_counterfactual_chart_and_a_report(world, prompts_file, tmp_path, caplog):
    with caplog.at_level("INFO"):
        train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml"))
    folder = results_file(tmp_path).parent
    results = json.loads(results_file(tmp_path).read_text())
    responses = pd.read_parquet(folder / "responses_probe0.parquet")
    tokens = pd.read_parquet(folder / "tokens_probe0.parquet")
    assert len(responses) == (4 + 4) * 4 and set(responses.role) == {"E", "U"}
    assert {"question", "response_text", "reward", "advantage", "length", "S", "mean_token_entropy"} <= set(responses)
    assert len(tokens) == responses.length.sum() and tokens.token.map(type).eq(str).all()
    assert tokens[tokens.role == "U"].contribution.sum() == pytest.approx(results["delta_h1"], rel=1e-4)
    probe = results["probes"][0]
    assert len(probe["top_tokens"]) == 10 and len(probe["top_responses"]) == 10
    selections = {"all", "top_entropy_0.2", "top_entropy_0.5", "clip_cov", "kl_cov"}
    assert selections | {"entropy_coef_for_zero"} == probe["counterfactuals"].keys()
    entropy_coef = probe["counterfactuals"]["entropy_coef_for_zero"]
    assert entropy_coef["delta_h1_at_checkpoint_coef"] == probe["delta_h1"] and entropy_coef["method"] == "linear"
    assert (folder / "counterfactuals_probe0.png").exists()
    page = (folder / "report.html").read_text()
    headline = re.search(r"δH₁ = (\S+) ± (\S+) nats", page)
    assert float(headline[1]) == pytest.approx(results["delta_h1"], rel=1e-3)
    assert float(headline[2]) == pytest.approx(results["delta_h1_se"], rel=1e-3)
    assert "data:image/png;base64," in page
    # Resolved or not, and the sizes that would resolve it, in results.json, the printed line and the report.
    assert results["resolved"] == probe["resolved"] == (abs(probe["delta_h1"]) >= 2 * probe["delta_h1_se"])
    sizes, seconds = probe["sizes_for_target"], probe["seconds_per_prompt"]
    assert results["sizes_for_target"] == sizes and seconds["E"] > 0 and seconds["U"] > 0
    v = {role: probe["delta_h1_se_parts"][role] ** 2 * 4 for role in "EU"}  # B_E = B_U = 4
    assert v["E"] / sizes["B_E"] + v["U"] / sizes["B_U"] <= (probe["delta_h1"] / 3) ** 2 * (1 + 1e-9)
    (line,) = [r.message for r in caplog.records if r.message.startswith("δH₁ = ")]
    status = "resolved (|δH₁| ≥ 2 SE)" if probe["resolved"] else f"--data.B_E {sizes['B_E']} --data.B_U {sizes['B_U']}"
    assert status in line and status in page
