"""Typed configuration shared by the LightningModule, the DataModule and the CLI.

Choices are `Literal`s, so `--help` and `--print_config` list the allowed values and the CLI refuses
a bad one with the allowed set. Groups validate themselves on construction, so a bad value stops the
run before the model loads, with a one-line message naming the field and the value.
"""

from dataclasses import dataclass
from typing import Literal

# E: entropy batch (gives ΣX), U: update batch (gives ΣY), V: evaluation batch (the true change, eta_sweep)
Role = Literal["E", "U", "V"]
# How ∇J̄ becomes the step δH₁ is measured along (probe_lightning/update.py).
Update = Literal["identity", "adam_precondition", "adamw_step"]
# Which entropy δH₁ predicts the change of (docs/math.md "Which entropy"), and how X estimates its gradient.
EntropyTarget = Literal["token_mean", "budget", "per_token_avg", "dr_grpo"]
Estimator = Literal["rb", "naive"]
# The trainer's loss, with TRL's names ("seed": the seed probe's own A_g / L_max loss).
LossType = Literal["seed", "grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["none", "group", "batch"]
Source = Literal["arithmetic", "jsonl", "hf"]


class ProbeConfigError(ValueError):
    """A configuration value the probe cannot run with; the message names the field and the value."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ProbeConfigError(message)


@dataclass
class SamplingConfig:
    use_sequence_processor: bool = True  # False: the seed's legacy path (direct model.generate)


@dataclass
class BatchConfig:
    rollout_batch_size: int = 8  # prompts per predict_step

    def __post_init__(self):
        require(
            self.rollout_batch_size >= 1,
            f"batch_config.rollout_batch_size must be >= 1, got {self.rollout_batch_size}",
        )


@dataclass
class TrainerConfig:
    """The user's GRPOTrainer settings that shape its step, with TRL's names. None: the checkpoint's
    training_args.bin, else TRL's default. TRL's num_generations is model.G; its max_completion_length
    is model.generation.max_new_tokens."""

    loss_type: LossType | None = None
    scale_rewards: ScaleRewards | None = None
    max_grad_norm: float | None = None  # 0: no clipping (as in the HF Trainer)
    beta: float | None = None  # the KL coefficient; the probe models beta = 0 only
