"""Reading the user's trainer settings from a real TRL checkpoint, safely, with config and defaults around it."""

import logging
import os
import sys

import datasets
import pytest
import torch
import trl
from tiny_models import tiny_llama

from probe_lightning.build import build_probe
from probe_lightning.checkpoints import load_checkpoint
from probe_lightning.config import ProbeConfigError, TrainerConfig
from probe_lightning.sequence_processor import SequenceProcessor
from probe_lightning.settings import ProbeSettings
from probe_lightning.trainer_loss import TrainerSettings
from probe_lightning.training_args import read_training_args, resolve_trainer_settings

SAVED = dict(
    loss_type="bnpo", scale_rewards="none", max_completion_length=24, num_generations=3, max_grad_norm=0.5, beta=0.0
)  # every value but beta differs from TRL's default


def grpo_config(output_dir, **overrides) -> trl.GRPOConfig:
    return trl.GRPOConfig(
        output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        **overrides,
    )


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """checkpoint-1 of one real GRPOTrainer step with the SAVED settings on a tiny model."""
    output_dir = tmp_path_factory.mktemp("grpo_run")
    args = grpo_config(
        output_dir, **SAVED, per_device_train_batch_size=3, gradient_accumulation_steps=1,
        max_steps=1, save_steps=1, logging_steps=1,
    )
    trainer = trl.GRPOTrainer(
        model=tiny_llama(tokenizer),
        reward_funcs=lambda prompts, completions, **kwargs: [float(len(c)) for c in completions],
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
    assert read_training_args(checkpoint) == SAVED
    settings, sources = resolve_trainer_settings({}, checkpoint)
    assert settings == TrainerSettings(**SAVED)
    assert set(sources.values()) == {"checkpoint"}


def test_config_values_win_over_the_checkpoint(checkpoint):
    settings, sources = resolve_trainer_settings({"loss_type": "dapo", "max_grad_norm": None}, checkpoint)
    assert (settings.loss_type, sources["loss_type"]) == ("dapo", "config")
    assert (settings.max_grad_norm, sources["max_grad_norm"]) == (0.5, "checkpoint")  # None = not set


def test_reads_without_trl_transformers_or_accelerate_importable(checkpoint, monkeypatch):
    for package in ("trl", "transformers", "accelerate"):
        monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    assert read_training_args(checkpoint) == SAVED


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


def test_no_checkpoint_gives_trl_defaults_and_the_probes_batch_shape_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="probe_lightning.training_args"):
        settings, sources = resolve_trainer_settings({"num_generations": None}, None)
    assert settings == TrainerSettings(
        loss_type="dapo", scale_rewards="group", max_grad_norm=1.0, num_generations=4, max_completion_length=64
    )
    assert set(sources.values()) == {"default"}
    assert caplog.records == []


def test_old_trl_boolean_scale_rewards_is_mapped(tmp_path):
    config = grpo_config(tmp_path)
    config.scale_rewards = False  # TRL < 0.22 saved a bool; GRPOConfig maps it only in __post_init__
    assert read_training_args(saved_args(tmp_path / "checkpoint-1", config))["scale_rewards"] == "none"


def test_a_checkpoint_trained_with_a_kl_term_is_refused(tmp_path):
    folder = saved_args(tmp_path / "checkpoint-1", grpo_config(tmp_path, beta=0.04))
    with pytest.raises(ProbeConfigError, match=r"beta=0.04"):
        resolve_trainer_settings({}, folder)


def test_an_unknown_setting_name_is_refused():
    with pytest.raises(ProbeConfigError, match=r"unknown trainer settings \['scale_reward'\]"):
        resolve_trainer_settings({"scale_reward": "none"}, None)


def test_the_probe_takes_every_setting_of_a_real_trl_checkpoint_and_says_where_from(checkpoint):
    settings = ProbeSettings(model=None, checkpoint=str(checkpoint), trainer=TrainerConfig(scale_rewards="batch"))
    assert (settings.G, settings.generation.max_new_tokens) == (3, 24)  # num_generations, max_completion_length
    loaded = load_checkpoint(str(checkpoint))
    probe = build_probe(SequenceProcessor(loaded.model, loaded.tokenizer, settings.generation), settings, loaded)
    results = probe.results.to_dict()
    expected = {**{name: {"value": value, "source": "checkpoint"} for name, value in SAVED.items()},
                "scale_rewards": {"value": "batch", "source": "config"}}  # fmt: skip
    assert results["trainer"] == expected
    assert results["update"] == "adamw_step"  # with an Adam state, the step AdamW takes
    assert results["learning_rate"] == pytest.approx(loaded.optimizer.learning_rate)
