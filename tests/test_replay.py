"""Saved rollouts (--data.save_rollouts) and their replay (--data.rollouts): the same samples give the same
δH₁ bit for bit, other targets and losses score those samples, other sampling settings are refused; the saved
rewards are kept unless --data.rescore; a folder of U batches alone gets its E batches drawn and sampled."""

import json
import shutil
from pathlib import Path

import datasets
import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger
from cli_helpers import CrashAtProbe, cli_args, probe_and_data, results_file

import train
from callbacks import BatchInvariants, DeltaH1Logger, RolloutRecorder
from probe_lightning import rollout_store
from probe_lightning.config import ProbeConfigError
from probe_lightning.data import ProbeDataModule


@pytest.fixture(scope="module")
def saved_run(world, prompts_file, tmp_path_factory) -> Path:
    """The log folder (results.json, rollouts/) of a run with --data.save_rollouts true."""
    save_dir = tmp_path_factory.mktemp("saved")
    train.main(cli_args(world, prompts_file, save_dir, "configs/sp.yaml", "--data.save_rollouts", "true"))
    return results_file(save_dir).parent


def replay(world, prompts_file, rollouts: Path, save_dir: Path, config="configs/sp.yaml", *extra) -> dict:
    """results.json of a run replaying `rollouts` under another generation seed and prompt draw, so nothing
    but the saved samples can make it agree with the saving run."""
    flags = ["--data.rollouts", str(rollouts), "--seed_everything", "1", "--data.seed", "1", *extra]
    train.main(cli_args(world, prompts_file, save_dir, config, *flags))
    return json.loads(results_file(save_dir).read_text())


def saved_results(log_dir: Path) -> dict:
    return json.loads((log_dir / "results.json").read_text())


def test_saving_writes_the_identity_and_one_row_per_prompt_of_each_rollout(world, saved_run):
    identity = json.loads((saved_run / "rollouts" / "identity.json").read_text())
    assert (identity["model"], identity["checkpoint"], identity["G"], identity["G_E"]) == (world, None, 4, 4)
    assert identity["use_sequence_processor"] is True
    assert identity["sampling"] == {
        "max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0, "pad_token_id": 0, "eos_token_id": None,
        "stop_strings": [],
    }  # fmt: skip
    assert (identity["data"]["B_E"], identity["data"]["B_U"], identity["data"]["rollout_batch_size"]) == (4, 4, 8)
    rows = datasets.load_from_disk(str(saved_run / "rollouts" / "probe_0"))
    assert rows["role"] == ["E"] * 4 + ["U"] * 4 and rows["batch_index"] == [0] * 4 + [1] * 4
    assert rows["last_in_probe"] == [False] * 4 + [True] * 4  # the batch that ends the probe
    for row in rows:
        assert row["gen_lens"] == [3, 3, 3, 3]  # the world has no EOS
        # generation's scores, which a replay's token_mean plug-ins use
        assert [len(e) for e in row["token_entropies"]] == [3] * 4 and [len(lp) for lp in row["token_logprobs"]] == [3] * 4
        assert [len(tokens) for tokens in row["sequences"]] == [row["prompt_len"] + 3] * 4
        assert [sum(mask[row["prompt_len"] :]) for mask in row["attention_masks"]] == [3] * 4
    rewards = [reward for group in rows["rewards"] for reward in group]
    assert sum(rewards) / len(rewards) == saved_results(saved_run)["reward_mean"]


def test_replaying_saved_rollouts_gives_the_bit_identical_delta_h1(world, prompts_file, saved_run, tmp_path):
    saved = saved_results(saved_run)
    replayed = replay(world, prompts_file, saved_run / "rollouts", tmp_path)
    assert saved["delta_h1"] != 0
    assert replayed["delta_h1"] == saved["delta_h1"] and replayed["delta_h1_se"] == saved["delta_h1_se"]
    assert replayed["probes"][0]["update_prompt_contributions"] == saved["probes"][0]["update_prompt_contributions"]


def test_rollouts_saved_without_generation_scores_get_them_from_teacher_forcing(
    world, prompts_file, saved_run, tmp_path
):
    """token_mean's plug-ins then come from teacher-forced entropies: the same δH₁ to float precision."""
    rollouts = tmp_path / "rollouts"
    shutil.copy(saved_run / "rollouts" / "identity.json", rollouts.mkdir() or rollouts / "identity.json")
    rows = datasets.load_from_disk(str(saved_run / "rollouts" / "probe_0"))
    rows.remove_columns(["token_logprobs", "token_entropies"]).save_to_disk(str(rollouts / "probe_0"))
    saved = saved_results(saved_run)
    replayed = replay(world, prompts_file, rollouts, tmp_path / "replay")
    assert replayed["delta_h1"] == pytest.approx(saved["delta_h1"], rel=1e-5, abs=0)
    assert replayed["entropy_mean"] == pytest.approx(saved["entropy_mean"], rel=1e-5, abs=0)


def test_replaying_the_legacy_path_gives_the_bit_identical_delta_h1(world, prompts_file, tmp_path):
    train.main(cli_args(world, prompts_file, tmp_path / "saved", "configs/legacy.yaml", "--data.save_rollouts", "true"))
    saved_run = results_file(tmp_path / "saved").parent
    replayed = replay(world, prompts_file, saved_run / "rollouts", tmp_path / "replay", "configs/legacy.yaml")
    saved = saved_results(saved_run)
    assert replayed["delta_h1"] == saved["delta_h1"] != 0 and replayed["delta_h1_se"] == saved["delta_h1_se"]


@pytest.mark.parametrize("change", [["--model.estimator", "naive"], ["--model.trainer.scale_rewards", "none"]])
def test_a_replay_under_another_estimator_or_loss_scores_the_same_samples(
    world, prompts_file, saved_run, tmp_path, change
):
    saved = saved_results(saved_run)
    replayed = replay(world, prompts_file, saved_run / "rollouts", tmp_path, "configs/sp.yaml", *change)
    assert (replayed["reward_mean"], replayed["entropy_mean"]) == (saved["reward_mean"], saved["entropy_mean"])
    assert replayed["delta_h1"] != pytest.approx(saved["delta_h1"], rel=1e-3)


def refusal(world, prompts_file, saved_run, tmp_path, *change) -> str:
    """The error a replay of saved_run's rollouts under `change` stops with."""
    with pytest.raises(SystemExit) as exit_info:
        replay(world, prompts_file, saved_run / "rollouts", tmp_path, "configs/sp.yaml", *change)
    text = str(exit_info.value.code)
    assert "\n" not in text and text.startswith(f"error: data.rollouts '{saved_run / 'rollouts'}' were sampled with")
    return text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--model.generation.temperature", "0.5"], "model.generation.temperature=1.0 (this run: 0.5)"),
        (["--model.G", "2"], "model.G=4 (this run: 2), model.G_E=4 (this run: 2)"),
    ],
)
def test_a_replay_under_other_sampling_settings_is_refused_naming_both_values(
    world, prompts_file, saved_run, tmp_path, change, message
):
    assert message in refusal(world, prompts_file, saved_run, tmp_path, *change)


def test_a_replay_with_another_model_is_refused_naming_both(world, prompts_file, saved_run, tmp_path):
    other = shutil.copytree(world, tmp_path / "other_model")
    text = refusal(world, prompts_file, saved_run, tmp_path, "--model.model", str(other))
    assert f"model.model='{world}' (this run: '{other}')" in text


def test_two_probes_are_saved_one_folder_each_and_both_replayed(world, prompts_file, tmp_path):
    train.main(
        cli_args(world, prompts_file, tmp_path / "saved", "configs/sp.yaml", "--data.save_rollouts", "true")
        + ["--data.num_probes", "2"]
    )
    saved_run = results_file(tmp_path / "saved").parent
    for k in (0, 1):
        assert datasets.load_from_disk(str(saved_run / "rollouts" / f"probe_{k}"))["probe_index"] == [k] * 8
    replayed = replay(world, prompts_file, saved_run / "rollouts", tmp_path / "replay")
    saved_rows = saved_results(saved_run)["probes"]
    assert [row["delta_h1"] for row in replayed["probes"]] == [row["delta_h1"] for row in saved_rows]
    assert saved_rows[0]["delta_h1"] != saved_rows[1]["delta_h1"]


def test_each_probe_is_written_when_it_ends_so_a_crash_keeps_the_finished_ones(world, prompts_file, tmp_path):
    probe, _ = probe_and_data(world, prompts_file, num_probes=3)
    data = ProbeDataModule(source="jsonl", path=prompts_file, B_E=3, B_U=3, num_probes=3, save_rollouts=True)
    trainer = pl.Trainer(
        accelerator="cpu", inference_mode=False, logger=CSVLogger(tmp_path), enable_progress_bar=False,
        callbacks=[BatchInvariants(), DeltaH1Logger(), RolloutRecorder(), CrashAtProbe(2)],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.predict(probe, datamodule=data, return_predictions=False)
    rollouts = Path(trainer.log_dir) / "rollouts"
    assert sorted(part.name for part in rollouts.glob("probe_*")) == ["probe_0", "probe_1"]


def test_a_folder_without_saved_rollouts_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ProbeConfigError, match=f"data.rollouts: no saved rollouts in '{tmp_path}'"):
        ProbeDataModule(rollouts=str(tmp_path))


def test_saving_while_replaying_is_refused(saved_run):
    with pytest.raises(ProbeConfigError, match="data.save_rollouts and data.rollouts are both set"):
        ProbeDataModule(rollouts=str(saved_run / "rollouts"), save_rollouts=True)


# Rewards: the saved ones are kept (what the trainer gave), unless data.rescore


def test_saved_rows_carry_the_prompt_and_the_reward_columns_and_the_identity_its_roles(saved_run):
    rows = datasets.load_from_disk(str(saved_run / "rollouts" / "probe_0"))
    for row in rows:
        assert json.loads(row["prompt"]) == [{"role": "user", "content": row["question"]}]
        assert json.loads(row["columns"]) == {"answer": row["answer"]}
    assert json.loads((saved_run / "rollouts" / "identity.json").read_text())["roles"] == ["E", "U"]


def rewritten(saved_run: Path, folder: Path, change) -> Path:
    """A copy of saved_run's rollouts with probe 0's rows changed by `change` (datasets.Dataset -> Dataset)."""
    folder.mkdir()
    shutil.copy(saved_run / "rollouts" / "identity.json", folder / "identity.json")
    change(datasets.load_from_disk(str(saved_run / "rollouts" / "probe_0"))).save_to_disk(str(folder / "probe_0"))
    return folder


def test_a_replay_keeps_the_rewards_saved_with_the_responses(world, prompts_file, saved_run, tmp_path):
    def flipped(rows):  # what another trainer's reward gave: 1 - r
        return rows.map(lambda row: {"rewards": [1.0 - r for r in row["rewards"]]})

    replayed = replay(world, prompts_file, rewritten(saved_run, tmp_path / "flipped", flipped), tmp_path / "replay")
    saved = saved_results(saved_run)
    assert replayed["reward_mean"] == pytest.approx(1.0 - saved["reward_mean"], abs=1e-7)
    assert replayed["delta_h1"] == pytest.approx(-saved["delta_h1"], rel=1e-4)  # A -> -A: Ȳ -> -Ȳ


def test_rescoring_with_the_built_in_reward_gives_the_saved_rewards_again(world, prompts_file, saved_run, tmp_path):
    flags = ["--data.rescore", "true"]
    replayed = replay(world, prompts_file, saved_run / "rollouts", tmp_path, "configs/sp.yaml", *flags)
    saved = saved_results(saved_run)
    assert (replayed["reward_mean"], replayed["delta_h1"]) == (saved["reward_mean"], saved["delta_h1"])


def test_rescoring_scores_the_saved_responses_with_this_runs_reward_function(world, prompts_file, saved_run, tmp_path):
    flags = ["--data.rescore", "true", "--data.reward_fn", "user_rewards:token_sum"]
    replayed = replay(world, prompts_file, saved_run / "rollouts", tmp_path, "configs/sp.yaml", *flags)
    rows = datasets.load_from_disk(str(saved_run / "rollouts" / "probe_0"))
    sums = [sum(sequence[row["prompt_len"] :]) for row in rows for sequence in row["sequences"]]
    assert replayed["reward_mean"] == pytest.approx(sum(sums) / len(sums), rel=1e-6)


def test_a_reward_function_without_rescoring_is_refused(world, prompts_file, saved_run, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        replay(world, prompts_file, saved_run / "rollouts", tmp_path, "configs/sp.yaml", "--data.reward_fn", "a:b")
    assert str(exit_info.value.code) == (
        f"error: data.reward_fn is set, but data.rollouts '{saved_run / 'rollouts'}' keep the rewards saved with "
        "them: add --data.rescore true to score them with data.reward_fn, or drop data.reward_fn"
    )


def test_rollouts_saved_before_prompts_and_columns_were_replay_and_rescore_as_before(
    world, prompts_file, saved_run, tmp_path
):
    folder = rewritten(saved_run, tmp_path / "old", lambda rows: rows.remove_columns(["prompt", "columns"]))
    saved = saved_results(saved_run)
    for rescore in ("false", "true"):
        replayed = replay(world, prompts_file, folder, tmp_path / rescore, "configs/sp.yaml", "--data.rescore", rescore)
        assert (replayed["reward_mean"], replayed["delta_h1"]) == (saved["reward_mean"], saved["delta_h1"])


# A folder of U batches alone: E is drawn and sampled as a run without data.rollouts draws it


def update_only_folder(saved_run: Path, folder: Path) -> Path:
    """saved_run's U batches alone, as a tool holding a trainer's batch would write them."""
    identity = json.loads((saved_run / "rollouts" / "identity.json").read_text())
    rollout_store.write_identity(folder, identity | {"roles": ["U"], "G_E": None, "data": None})
    rows = datasets.load_from_disk(str(saved_run / "rollouts" / "probe_0")).filter(lambda row: row["role"] == "U")
    rollout_store.save_probe(folder, 0, [row | {"batch_index": 0} for row in rows])
    return folder


def test_update_only_rollouts_get_e_sampled_as_a_fresh_run_samples_it(world, prompts_file, saved_run, tmp_path):
    folder = update_only_folder(saved_run, tmp_path / "rollouts")
    train.main(cli_args(world, prompts_file, tmp_path / "replay", "configs/sp.yaml", "--data.rollouts", str(folder)))
    replayed = json.loads(results_file(tmp_path / "replay").read_text())
    saved = saved_results(saved_run)
    assert replayed["delta_h1"] == saved["delta_h1"] and replayed["delta_h1_se"] == saved["delta_h1_se"]
    assert replayed["probes"][0]["entropy_prompt_contributions"] == saved["probes"][0]["entropy_prompt_contributions"]


def test_update_only_rollouts_draw_e_from_this_runs_data_seed(world, prompts_file, saved_run, tmp_path):
    folder = update_only_folder(saved_run, tmp_path / "rollouts")
    flags = ["--data.rollouts", str(folder), "--data.seed", "1"]
    train.main(cli_args(world, prompts_file, tmp_path / "replay", "configs/sp.yaml", *flags))
    replayed = json.loads(results_file(tmp_path / "replay").read_text())["probes"][0]
    saved = saved_results(saved_run)["probes"][0]
    assert replayed["update_prompt_contributions"].keys() == saved["update_prompt_contributions"].keys()
    assert replayed["entropy_prompt_contributions"].keys() != saved["entropy_prompt_contributions"].keys()


def test_saved_nulls_are_not_checked_and_saved_values_are():
    run = {"model": "m", "checkpoint": None, "G": 4, "G_E": 4, "use_sequence_processor": True,
           "sampling": {"temperature": 1.0, "top_p": 1.0}}  # fmt: skip
    rollout_store.check_replay(run | {"G_E": None, "sampling": {"temperature": None, "top_p": 1.0}}, run, "f")
    with pytest.raises(ProbeConfigError, match=r"model.G=8 \(this run: 4\)"):
        rollout_store.check_replay(run | {"G": 8, "G_E": None}, run, "f")


def test_saved_roles_other_than_all_or_u_alone_are_refused(tmp_path):
    rollout_store.write_identity(tmp_path, {"roles": ["V", "U"]})
    with pytest.raises(ProbeConfigError, match=r"identity.json roles \['V', 'U'\] have U batches with other roles"):
        ProbeDataModule(rollouts=str(tmp_path))
