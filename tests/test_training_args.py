"""Reading the user's trainer settings from a real TRL checkpoint, safely, with config and defaults around it."""

import json
import logging
import os
import sys

import datasets
import pytest
import torch
import trl
from transformers import AutoModelForCausalLM, TrainingArguments
from user_rewards import even_token_sum, token_sum

from probe_lightning.build import build_probe
from probe_lightning.checkpoints import load_checkpoint
from probe_lightning.config import ProbeConfigError, TrainerConfig
from probe_lightning.results import later_steps
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor
from probe_lightning.settings import ProbeSettings
from probe_lightning.trainer_loss import TrainerSettings
from probe_lightning.training_args import SETTING_NAMES, read_training_args, resolve_trainer_settings

# Every value differs from TRL's default; the run uses each (one real step, then checkpoint-1).
SAVED = dict(
    loss_type="grpo", scale_rewards="none", max_completion_length=24, num_generations=3, max_grad_norm=0.5,
    beta=0.04, use_bias_correction_kl=False, importance_sampling_level="sequence", epsilon=0.3, epsilon_high=0.28,
    delta=2.0, off_policy_mask_threshold=0.5, top_entropy_quantile=0.5, mask_truncated_completions=True,
    entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=50.0, reward_weights=[1.0, 0.5],
    num_iterations=2, temperature=0.9,
)  # fmt: skip
# The others, saved with TRL's defaults.
UNCHANGED = {name: getattr(TrainerSettings(), name) for name in SETTING_NAMES if name not in SAVED}


def grpo_config(output_dir, **overrides) -> trl.GRPOConfig:
    return trl.GRPOConfig(
        output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        **overrides,
    )


@pytest.fixture(scope="module")
def checkpoint(tokenizer, base_folder, tmp_path_factory):
    """checkpoint-1 of one real GRPOTrainer step with the SAVED settings on a tiny model."""
    output_dir = tmp_path_factory.mktemp("grpo_run")
    args = grpo_config(
        output_dir, **SAVED, per_device_train_batch_size=3, gradient_accumulation_steps=1,
        max_steps=1, save_steps=1, logging_steps=1,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=str(base_folder),
        reward_funcs=[token_sum, even_token_sum],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["The cat sat", "Two plus two is", "Hello"]}),
        processing_class=tokenizer,
    )
    trainer.train()
    return output_dir / "checkpoint-1"


def saved_args(folder, config: trl.GRPOConfig):
    """training_args.bin the way HF Trainer._save writes it."""
    folder.mkdir(exist_ok=True)
    torch.save(config, folder / "training_args.bin")
    return folder


def test_reads_every_setting_back_from_a_real_trl_checkpoint(checkpoint):
    assert read_training_args(checkpoint) == SAVED | UNCHANGED  # every setting the probe knows
    settings, sources = resolve_trainer_settings({}, checkpoint)
    controller = json.loads((checkpoint / "entropy_ctrl_state.json").read_text())
    saved_state = {"entropy_coef": controller["entropy_coef"], "last_world_entropy": controller["last_world_entropy"]}
    assert settings == TrainerSettings(**SAVED | UNCHANGED | saved_state)
    assert settings.last_world_entropy < SAVED["entropy_target"] and settings.entropy_bonus == settings.entropy_coef
    assert {sources[name] for name in SETTING_NAMES if name != "entropy_coef"} == {"checkpoint"}
    assert sources["entropy_coef"] == sources["last_world_entropy"] == "checkpoint (entropy_ctrl_state.json)"


def test_config_values_win_over_the_checkpoint_and_a_contradiction_is_marked(checkpoint):
    settings, sources = resolve_trainer_settings({"loss_type": "dapo", "beta": 0.04, "max_grad_norm": None}, checkpoint)
    assert (settings.loss_type, sources["loss_type"]) == ("dapo", "config (checkpoint had 'grpo')")
    assert (settings.beta, sources["beta"]) == (0.04, "config")  # the same value: no contradiction
    assert (settings.max_grad_norm, sources["max_grad_norm"]) == (0.5, "checkpoint")  # None = not set


def test_a_configured_entropy_coef_wins_over_the_saved_controller_and_is_marked(checkpoint):
    saved = json.loads((checkpoint / "entropy_ctrl_state.json").read_text())["entropy_coef"]
    settings, sources = resolve_trainer_settings({"entropy_coef": 0.3}, checkpoint)
    assert settings.entropy_bonus == 0.3
    assert sources["entropy_coef"] == f"config (entropy_ctrl_state.json had {saved!r})"


def test_adaptive_entropy_without_a_saved_controller_starts_as_trl_does_with_the_gate_closed(tmp_path):
    folder = saved_args(tmp_path / "checkpoint-1", grpo_config(tmp_path, use_adaptive_entropy=True, entropy_coef=0.1))
    settings, sources = resolve_trainer_settings({}, folder)
    assert (settings.entropy_coef, settings.last_world_entropy, settings.entropy_bonus) == (0.1, None, 0.0)
    assert sources["last_world_entropy"] == "default (no entropy_ctrl_state.json: TRL's initial state, no measurement)"


def test_a_corrupt_controller_state_is_refused_in_one_line(tmp_path):
    folder = saved_args(tmp_path / "checkpoint-1", grpo_config(tmp_path, use_adaptive_entropy=True))
    (folder / "entropy_ctrl_state.json").write_text('{"entropy_coef": 0.1}')
    with pytest.raises(ProbeConfigError, match=r"entropy_ctrl_state.json is not the entropy controller state") as error:
        resolve_trainer_settings({}, folder)
    assert "\n" not in str(error.value)


def test_reads_without_trl_transformers_or_accelerate_importable(checkpoint, monkeypatch):
    for package in ("trl", "transformers", "accelerate"):
        monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    assert read_training_args(checkpoint) == SAVED | UNCHANGED


class WritesAFile:
    """A pickle that creates `marker` when unpickled the ordinary way."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_training_args_file_is_not_executed_and_defaults_are_warned(tmp_path, caplog):
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    torch.save(WritesAFile(marker), folder / "training_args.bin")
    with caplog.at_level(logging.WARNING, logger="probe_lightning.training_args"):
        settings, sources = resolve_trainer_settings({"max_grad_norm": 0.25}, folder)
    assert not marker.exists()
    assert settings == TrainerSettings(max_grad_norm=0.25)
    assert sources["max_grad_norm"] == "config" and sources["loss_type"] == "default"
    [record] = caplog.records
    assert "refused global posix.system" in record.message
    assert "loss_type='dapo'" in record.message and "num_generations=8" in record.message
    assert "max_grad_norm" not in record.message  # given by config, not assumed
    torch.load(folder / "training_args.bin", weights_only=False)  # the ordinary way runs it: the file was armed
    assert marker.exists()


def test_a_missing_file_gives_trl_defaults_and_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="probe_lightning.training_args"):
        settings, sources = resolve_trainer_settings({}, tmp_path)
    assert settings == TrainerSettings()
    assert set(sources.values()) == {"default"}
    [record] = caplog.records
    assert "no training_args.bin in" in record.message


def test_a_plain_trainer_checkpoint_gives_trl_defaults_and_one_warning(tmp_path, caplog):
    # An LM-loss Trainer's checkpoint: its TrainingArguments carry no GRPO batch shape, so TRL's defaults (G = 8,
    # 512 new tokens: 8x the probe's own per prompt) are assumed, which the user must hear about.
    torch.save(
        TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.5, report_to=[]), tmp_path / "training_args.bin"
    )
    with caplog.at_level(logging.WARNING, logger="probe_lightning.training_args"):
        settings, sources = resolve_trainer_settings({}, tmp_path)
    assert settings == TrainerSettings(max_grad_norm=0.5)
    assert sources["max_grad_norm"] == "checkpoint" and sources["num_generations"] == "default"
    [record] = caplog.records
    assert "holds no GRPO settings" in record.message
    assert "num_generations=8" in record.message and "max_completion_length=512" in record.message


def test_no_checkpoint_gives_trl_defaults_and_the_probes_batch_shape_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="probe_lightning.training_args"):
        settings, sources = resolve_trainer_settings({"num_generations": None}, None)
    assert settings == TrainerSettings(num_generations=4, max_completion_length=64)
    assert set(sources.values()) == {"default"}
    assert caplog.records == []


def test_old_trl_boolean_scale_rewards_is_mapped(tmp_path):
    config = grpo_config(tmp_path)
    config.scale_rewards = False  # TRL < 0.22 saved a bool; GRPOConfig maps it only in __post_init__
    assert read_training_args(saved_args(tmp_path / "checkpoint-1", config))["scale_rewards"] == "none"


def test_a_checkpoint_with_a_setting_the_probe_does_not_predict_is_refused_naming_it(tmp_path):
    config = grpo_config(tmp_path, multi_objective_aggregation="normalize_then_sum")
    folder = saved_args(tmp_path / "checkpoint-1", config)
    with pytest.raises(ProbeConfigError, match=r"multi_objective_aggregation='normalize_then_sum'"):
        resolve_trainer_settings({}, folder)


def test_a_loss_type_from_a_newer_trl_in_a_checkpoint_is_refused_naming_it_and_the_predicted_ones(tmp_path):
    config = grpo_config(tmp_path)
    config.loss_type = "gmpo"  # GRPOConfig leaves loss_type to the trainer to check
    folder = saved_args(tmp_path / "checkpoint-1", config)
    with pytest.raises(ProbeConfigError, match=r"loss_type='gmpo' is not a loss this probe predicts .*: it predicts "
                       r"seed, grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo$") as error:  # fmt: skip
        resolve_trainer_settings({}, folder)
    assert "\n" not in str(error.value)


def test_an_unknown_setting_name_is_refused():
    with pytest.raises(ProbeConfigError, match=r"unknown trainer settings \['scale_reward'\]"):
        resolve_trainer_settings({"scale_reward": "none"}, None)


# ---- the probe's settings: the KL term's reference, top-p, reward weights, later steps ----


def test_a_full_checkpoint_with_a_kl_term_needs_its_reference_model_named(checkpoint):
    refusal = r"beta=0.04 needs TRL's reference model.*--model.reference PATH"
    with pytest.raises(ProbeConfigError, match=refusal) as error:
        ProbeSettings(model=None, checkpoint=str(checkpoint))
    assert "\n" not in str(error.value)


def test_a_config_json_naming_a_local_base_model_gives_the_reference(base_folder, tmp_path):
    folder = saved_args(tmp_path / "checkpoint-3", grpo_config(tmp_path, beta=0.04))
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(base_folder)}))  # as transformers 4 wrote it
    settings = ProbeSettings(model=None, checkpoint=str(folder))
    assert settings.reference == str(base_folder) and "_name_or_path" in settings.reference_source


def test_a_lora_checkpoint_references_its_base_with_the_adapter_disabled(tmp_path):
    folder = saved_args(tmp_path / "checkpoint-1", grpo_config(tmp_path, beta=0.04))
    (folder / "adapter_config.json").write_text("{}")
    settings = ProbeSettings(model=None, checkpoint=str(folder))
    assert settings.reference is None and "LoRA adapter disabled" in settings.reference_source
    (folder / "ref").mkdir()  # TRL's initial copy of a re-trained adapter
    with pytest.raises(ProbeConfigError, match=r"second adapter 'ref'"):
        ProbeSettings(model=None, checkpoint=str(folder))


def test_a_reference_without_a_kl_term_is_refused():
    with pytest.raises(ProbeConfigError, match=r"model.reference 'base' is set, but trainer beta=0"):
        ProbeSettings(reference="base")


@pytest.mark.parametrize("trainer", [dict(entropy_coef=0.01), dict(top_entropy_quantile=0.2), dict(beta=0.04)])
def test_entropy_and_kl_terms_are_refused_with_top_p(trainer):
    with pytest.raises(ProbeConfigError, match=r"generation.top_p=0.9 with trainer .*: TRL's entropies and KL"):
        ProbeSettings(generation=GenerationConfig(top_p=0.9), trainer=TrainerConfig(**trainer))


def test_the_temperature_the_trainer_used_is_marked_when_the_probe_samples_at_another(checkpoint, base_folder):
    settings = ProbeSettings(model=None, checkpoint=str(checkpoint), reference=str(base_folder))
    assert settings.trainer_settings.temperature == 1.0
    assert settings.trainer_sources["temperature"] == "config (checkpoint had 0.9)"


def test_the_checkpoints_reward_weights_need_as_many_reward_functions(checkpoint, base_folder):
    settings = ProbeSettings(model=None, checkpoint=str(checkpoint), reference=str(base_folder))
    refusal = r"reward_weights \[1.0, 0.5\] are for 2 reward functions, and this run has 1"
    with pytest.raises(ProbeConfigError, match=refusal):
        settings.reward_functions(None)  # the built-in answer match


def test_several_optimizer_steps_per_generation_are_said_not_to_be_predicted():
    trainer = TrainerSettings(num_iterations=2, steps_per_generation=4, gradient_accumulation_steps=2)
    assert trainer.optimizer_steps_per_generation == 4
    assert "takes 4 optimizer steps on each generation batch; δH₁ predicts the first" in later_steps(trainer)
    assert later_steps(TrainerSettings(steps_per_generation=4, gradient_accumulation_steps=4)) is None  # one step


def test_the_probe_takes_every_setting_of_a_real_trl_checkpoint_and_says_where_from(checkpoint, base_folder):
    settings = ProbeSettings(
        model=None, checkpoint=str(checkpoint), reference=str(base_folder), trainer=TrainerConfig(scale_rewards="batch")
    )
    assert (settings.G, settings.generation.max_new_tokens) == (3, 24)  # num_generations, max_completion_length
    loaded = load_checkpoint(str(checkpoint))
    rewards = RewardFunctions([token_sum, even_token_sum])
    processor = SequenceProcessor(loaded.model, loaded.tokenizer, settings.generation)
    probe = build_probe(processor, settings, loaded, rewards)
    results = probe.results.to_dict()
    controller = json.loads((checkpoint / "entropy_ctrl_state.json").read_text())
    expected = {
        **{name: {"value": value, "source": "checkpoint"} for name, value in SAVED.items()},
        **{name: {"value": value, "source": "checkpoint"} for name, value in UNCHANGED.items()},
        "scale_rewards": {"value": "batch", "source": "config (checkpoint had 'none')"},
        "temperature": {"value": 1.0, "source": "config (checkpoint had 0.9)"},  # generation.temperature
        "top_p": {"value": 1.0, "source": "config"},
        "entropy_coef": {"value": controller["entropy_coef"], "source": "checkpoint (entropy_ctrl_state.json)"},
        "last_world_entropy": {"value": controller["last_world_entropy"],
                               "source": "checkpoint (entropy_ctrl_state.json)"},
    }  # fmt: skip
    assert results["trainer"] == expected
    assert results["update"] == "adamw_step"  # with an Adam state, the step AdamW takes
    assert results["learning_rate"] == pytest.approx(loaded.optimizer.learning_rate)
    assert "δH₁ predicts the first (importance ratio 1)" in results["later_steps"]  # num_iterations 2
    assert any(str(base_folder) in note and "beta=0.04" in note for note in results["notes"])
    assert probe.make_rollout.rewards.weights.tolist() == SAVED["reward_weights"]
    reference = AutoModelForCausalLM.from_pretrained(base_folder)
    loaded_reference = probe.update_batch.reference.processor.model
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), loaded_reference.parameters()))
