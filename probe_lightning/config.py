"""Typed configuration shared by the LightningModule, the DataModule and the CLI.

Choices are `Literal`s, so `--help` and `--print_config` list the allowed values and the CLI refuses
a bad one with the allowed set. Groups validate themselves on construction, so a bad value stops the
run before the model loads, with a one-line message naming the field and the value.
"""

from dataclasses import dataclass
from typing import Literal

Role = Literal["E", "U"]  # E: entropy batch (gives ΣX), U: update batch (gives ΣY)
# How ∇J̄ becomes the step δH₁ is measured along (probe_lightning/update.py).
Update = Literal["identity", "adam_precondition", "adamw_step"]
WeightingMode = Literal["dr_grpo", "per_token_avg", "budget"]
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
