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
# The trainer's loss, with TRL 1.16's names ("seed": the seed probe's own A_g / L_max loss).
LossType = Literal["seed", "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
ScaleRewards = Literal["none", "group", "batch"]
ImportanceSamplingLevel = Literal["token", "sequence"]
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
    """The user's GRPOTrainer settings that shape its step, with TRL's names (docs/math.md §5). None: the
    checkpoint's training_args.bin, else TRL's default; a value that differs from the checkpoint's wins and is
    marked in results.json. TRL's num_generations is model.G, its max_completion_length
    model.generation.max_new_tokens, its temperature and top_p model.generation's, its reward_weights
    data.reward_weights."""

    loss_type: LossType | None = None
    scale_rewards: ScaleRewards | None = None
    max_grad_norm: float | None = None  # 0: no clipping (as in the HF Trainer)
    beta: float | None = None  # the KL coefficient; > 0 needs the reference model (model.reference)
    use_bias_correction_kl: bool | None = None  # the KL term times the importance ratio
    importance_sampling_level: ImportanceSamplingLevel | None = None
    epsilon: float | None = None  # the ratio's clip range (cispo: epsilon_high, else epsilon, clamps it)
    epsilon_high: float | None = None
    top_entropy_quantile: float | None = None  # ρ < 1: only the top-ρ entropy tokens in the policy term
    mask_truncated_completions: bool | None = None  # completions without EOS leave the loss
    entropy_coef: float | None = None  # the entropy bonus's coefficient
    use_adaptive_entropy: bool | None = None  # the bonus gated by the last measured entropy (Skywork-OR1)
    entropy_target: float | None = None  # the adaptive bonus's target entropy (nats): not model.entropy_target
    num_iterations: int | None = None  # > 1: later optimizer steps reuse the samples (not predicted)
    steps_per_generation: int | None = None
    gradient_accumulation_steps: int | None = None
