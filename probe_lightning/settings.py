"""ProbeSettings: the probe's settings, validated, with the trainer's settings resolved.

Checked on construction, so a bad value stops the run before the model loads.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

from probe_lightning.config import EntropyTarget, Estimator, SamplingConfig, TrainerConfig, Update, require
from probe_lightning.models import DEFAULT_MODEL
from probe_lightning.sampling import GenerationConfig
from probe_lightning.trainer_loss import TrainerSettings
from probe_lightning.training_args import resolve_trainer_settings
from probe_lightning.update import resolve_update


@dataclass
class ProbeSettings:
    """The probe's settings (the LightningModule's arguments; see EntropyProbe for each), validated, with
    the trainer's settings resolved: config, else the checkpoint's training_args.bin, else TRL's defaults."""

    model: str | None = DEFAULT_MODEL
    checkpoint: str | None = None
    optimizer_state: str | None = None
    update: Update | None = None
    learning_rate: float | None = None
    G: int | None = None
    G_E: int | None = None
    entropy_target: EntropyTarget = "token_mean"
    estimator: Estimator = "rb"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    standard_error: bool = True
    eta_sweep: list[float] | None = None
    save_vectors: bool = False
    next_checkpoint: str | None = None
    trainer_settings: TrainerSettings = field(init=False)
    trainer_sources: dict[str, str] = field(init=False)  # each trainer setting: config, checkpoint or default

    def __post_init__(self):
        require(self.G is None or self.G >= 1, f"model.G must be >= 1, got {self.G}")
        self.eta_sweep = sorted(self.eta_sweep or [])
        require(all(eta >= 0 for eta in self.eta_sweep), f"model.eta_sweep must hold η >= 0, got {self.eta_sweep}")
        require(self.G_E is None or self.G_E >= 1, f"model.G_E must be >= 1, got {self.G_E}")
        require(
            self.learning_rate is None or self.learning_rate >= 0,
            f"model.learning_rate must be >= 0, got {self.learning_rate}",
        )
        require(
            not (self.checkpoint and self.optimizer_state),
            "model.checkpoint and model.optimizer_state are both set: a checkpoint carries its own optimizer state",
        )
        require(
            self.next_checkpoint is None or self.checkpoint,
            "model.next_checkpoint needs model.checkpoint: the checkpoint whose next step is predicted",
        )
        for name in ("checkpoint", "optimizer_state", "next_checkpoint"):
            path = getattr(self, name)
            require(path is None or Path(path).exists(), f"model.{name}: no such file or folder {path!r}")
        require(
            self.entropy_target != "dr_grpo" or self.estimator == "naive",
            "model.estimator rb does not apply to entropy_target dr_grpo (its L_max couples the G responses): "
            "use estimator naive, or entropy_target token_mean, budget or per_token_avg",
        )
        has_state = bool(self.checkpoint or self.optimizer_state) and self.update != "identity"
        self.update = resolve_update(self.update, has_state)
        require(self.model is not None or self.checkpoint, "model.model is null and there is no model.checkpoint")
        trainer, G = self.trainer, self.G
        configured = {
            "loss_type": trainer.loss_type, "scale_rewards": trainer.scale_rewards,
            "max_grad_norm": trainer.max_grad_norm, "beta": trainer.beta,
            "num_generations": G, "max_completion_length": self.generation.max_new_tokens,
        }  # fmt: skip
        folder = self.checkpoint if self.checkpoint and Path(self.checkpoint).is_dir() else None
        self.trainer_settings, self.trainer_sources = resolve_trainer_settings(configured, folder)
        self.G = self.trainer_settings.num_generations
        self.G_E = self.G if self.G_E is None else self.G_E
        self.generation = replace(self.generation, max_new_tokens=self.trainer_settings.max_completion_length)
