"""ProbeSettings: the probe's settings, validated, with the trainer's settings resolved.

Checked on construction, so a bad value stops the run before the model loads.
"""

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from probe_lightning.config import (
    EntropyTarget,
    Estimator,
    ProbeConfigError,
    SamplingConfig,
    TrainerConfig,
    Update,
    require,
)
from probe_lightning.models import DEFAULT_MODEL
from probe_lightning.reward_functions import RewardFunctions
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
    reference: str | None = None
    entropy_coef_for_zero: bool = True
    breakdown_se: bool = True
    top_contributions_se: bool = False
    trainer_settings: TrainerSettings = field(init=False)
    trainer_sources: dict[str, str] = field(init=False)  # each trainer setting: config, checkpoint or default
    reference_source: str | None = field(init=False)  # with beta != 0: what the KL term's reference model is

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
        configured = {f.name: getattr(self.trainer, f.name) for f in fields(TrainerConfig)} | {
            "num_generations": self.G, "max_completion_length": self.generation.max_new_tokens,
            "temperature": self.generation.temperature, "top_p": self.generation.top_p,  # q: the probe's sampling
        }  # fmt: skip
        folder = self.checkpoint if self.checkpoint and Path(self.checkpoint).is_dir() else None
        self.trainer_settings, self.trainer_sources = resolve_trainer_settings(configured, folder)
        self.G = self.trainer_settings.num_generations
        self.G_E = self.G if self.G_E is None else self.G_E
        self.generation = replace(self.generation, max_new_tokens=self.trainer_settings.max_completion_length)
        trainer = self.trainer_settings
        uses = {"beta": trainer.beta, "entropy_coef": trainer.entropy_bonus,
                "top_entropy_quantile": trainer.top_entropy_quantile if trainer.top_entropy_quantile < 1 else 0}
        untruncated = [f"{name}={value!r}" for name, value in uses.items() if value]  # fmt: skip
        require(
            self.generation.top_p == 1 or not untruncated,
            f"generation.top_p={self.generation.top_p} with trainer {', '.join(untruncated)}: TRL's entropies and "
            "KL term are of softmax(z/τ) without top-p, the probe's teacher forcing of q with it: set "
            "generation.top_p 1 (TRL's loss ignores top-p)",
        )
        require(
            self.reference is None or trainer.beta != 0,
            f"model.reference {self.reference!r} is set, but trainer beta=0: no KL term uses a reference model",
        )
        self.reference_source = None
        if trainer.beta:
            self.reference, self.reference_source = self._reference()

    def _reference(self) -> tuple[str | None, str]:
        """The KL term's reference model, as TRL's trainer has it: (a model to load, or None, what it is)."""
        if self.reference:
            return self.reference, f"model.reference {self.reference!r}"
        if not self.checkpoint:
            return None, "the probed model itself: without a checkpoint it is the initial model, TRL's reference"
        folder = Path(self.checkpoint)
        if folder.is_file():  # a Lightning .ckpt: model.model is the model it was trained from
            return self.model, f"model.model {self.model!r}, the model the Lightning checkpoint was trained from"
        if (folder / "adapter_config.json").is_file():
            require(
                not (folder / "ref").is_dir(),
                f"checkpoint {self.checkpoint!r} holds a second adapter 'ref', TRL's initial copy of a re-trained "
                "adapter: the KL term's reference is that adapter, which the probe does not load",
            )
            return None, "the base model with the LoRA adapter disabled (TRL's reference for a PEFT run)"
        config = folder / "config.json"
        name = json.loads(config.read_text()).get("_name_or_path") if config.is_file() else None
        if name and Path(name).is_dir():
            return name, f"{name!r}, the base model checkpoint config.json names (_name_or_path)"
        found = f"names {name!r}, not a local folder" if name else "names no base model (_name_or_path)"
        raise ProbeConfigError(
            f"trainer beta={self.trainer_settings.beta} needs TRL's reference model, the model full fine-tuning "
            f"started from; checkpoint {self.checkpoint!r} config.json {found}: pass it with --model.reference PATH"
        )

    def reward_functions(self, rewards: RewardFunctions | None) -> RewardFunctions:
        """The run's reward functions (None: the built-in answer match) with the trainer's reward_weights:
        data.reward_weights when given (a checkpoint's other weights are marked), else the checkpoint's; their
        count must be the functions'. trainer_settings.reward_weights and its source say which."""
        rewards = RewardFunctions() if rewards is None else rewards
        saved, source = self.trainer_settings.reward_weights, self.trainer_sources["reward_weights"]
        if rewards.configured_weights is not None:
            weights = rewards.configured_weights
            source = "config" if saved is None or saved == weights else f"config (checkpoint had {saved!r})"
        elif saved is not None:
            require(
                len(saved) == len(rewards.functions),
                f"the checkpoint's reward_weights {saved} are for {len(saved)} reward functions, and this run has "
                f"{len(rewards.functions)} ({', '.join(rewards.names)}): pass the trainer's reward functions with "
                "--data.reward_fn, or weights for these with --data.reward_weights",
            )
            weights, rewards = saved, RewardFunctions(rewards.functions, rewards.names, saved)
        else:
            return rewards
        self.trainer_settings = replace(self.trainer_settings, reward_weights=list(weights))
        self.trainer_sources["reward_weights"] = source
        return rewards
