"""EntropyProbe: the LightningModule. Set-up, predict_step, and the hand-off to `Probe` (probe.py).

Lightning runs the loop (devices, precision, loggers); the probe's state and math live in plain classes.
"""

from pathlib import Path

import lightning.pytorch as pl
import torch

from probe_lightning.build import build_probe, sampling_identity
from probe_lightning.checkpoints import LoadedCheckpoint, load_checkpoint
from probe_lightning.config import (
    EntropyTarget,
    Estimator,
    ProbeConfigError,
    SamplingConfig,
    TrainerConfig,
    Update,
    require,
)
from probe_lightning.data import PromptBatch
from probe_lightning.distributed import Collectives, check_strategy
from probe_lightning.models import DEFAULT_MODEL, load_model_and_tokenizer
from probe_lightning.probe import Probe, RolloutCheck, StepOutput
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor
from probe_lightning.settings import ProbeSettings


class EntropyProbe(pl.LightningModule):
    def __init__(
        self,
        model: str | None = DEFAULT_MODEL,
        checkpoint: str | None = None,
        optimizer_state: str | None = None,
        update: Update | None = None,
        learning_rate: float | None = None,
        G: int | None = None,
        G_E: int | None = None,
        entropy_target: EntropyTarget = "token_mean",
        estimator: Estimator = "rb",
        trainer: TrainerConfig = TrainerConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        generation: GenerationConfig = GenerationConfig(),
        standard_error: bool = True,
        eta_sweep: list[float] | None = None,
        save_vectors: bool = False,
        next_checkpoint: str | None = None,
        entropy_coef_for_zero: bool = True,
        reference: str | None = None,
        breakdown_se: bool = True,
        top_contributions_se: bool = False,
    ):
        """
        Args:
            model: an alias (default: the embedded SmolLM2-135M-Instruct), a local folder or a cached HF id.
                With a checkpoint: the base model of a LoRA adapter or Lightning .ckpt (None: a LoRA
                adapter's own adapter_config.json base).
            checkpoint: an HF Trainer/TRL checkpoint-N/ folder (full model or LoRA adapter, with
                optimizer.pt) or a Lightning .ckpt file; its weights and Adam state are probed.
            optimizer_state: without a checkpoint, a torch.save'd Adam/AdamW state_dict for `model`'s
                trainable parameters in model order.
            update: the update geometry (probe_lightning/update.py): identity (P = 1, plain SGD),
                adam_precondition (Ȳ = P ∇J̄, the seed's) or adamw_step (Ȳ = the exact AdamW step Δθ, with
                the trainer's clipping). None: adamw_step with an optimizer state, identity without.
            learning_rate: η. None: the lr the checkpoint's optimizer would use for its next step, without a
                checkpoint or optimizer_state TRL's default 1e-6.
            G: responses per update (U) prompt (TRL's num_generations); needs G >= 2, else every advantage
                is 0. None: the checkpoint's, else 4 (training_args.PROBE_DEFAULTS).
            G_E: responses per entropy (E) prompt; defaults to G. G_E = 1 drops the LOO baseline.
            entropy_target: the entropy whose change δH₁ predicts: token_mean (what trainers log),
                budget, per_token_avg, or dr_grpo (the seed's −S/L_max, biased when lengths vary).
            estimator: rb (exact per-token entropies, causal scores) or naive (−S, one score per response).
            trainer: the user's trainer settings (loss_type, scale_rewards, max_grad_norm, beta, entropy_coef,
                top_entropy_quantile, ...: config.TrainerConfig), as TRL names them; None: the checkpoint's
                training_args.bin, else TRL's default.
            standard_error: also compute δH₁'s plug-in standard error and the per-update-prompt
                contributions (one extra forward-mode pass over the probe's sequences).
            eta_sweep: learning rates at which to measure the true entropy change of the real step on a
                fresh evaluation batch (data.B_V prompts), beside δH₁(η) and the covariance proxy. Empty: off.
            save_vectors: write vectors_probe{k}.safetensors beside results.json: x_bar/NAME (X̄), grad_loss/NAME
                (the trainer's loss gradient as its optimizer receives it) and update/NAME (the predicted Δθ),
                NAME the parameter's key in the checkpoint's weights file.
            next_checkpoint: a later checkpoint of the same run as `checkpoint`: the step the trainer really
                took, held against the prediction (results.json's next_checkpoint, per probe).
            entropy_coef_for_zero: with standard_error, also find the entropy_coef c* whose step leaves the entropy
                unchanged (a counterfactual, with its SE); costs one more backward over the U batch and one more
                model-sized sum (~+20% of a probe on small models).
            breakdown_se: with standard_error, also the SEs of δH₁'s breakdown: each counterfactual selection (one
                more teacher forcing of the U batch, a backward per selection) and each parameter tensor's and block's
                share (one more backward per U prompt); about +60% on a probe of the default model. With
                data.target_rse they are taken once, at the final sizes.
            top_contributions_se: with breakdown_se, also the SE of each top response's and top token's
                contribution: one more backward per E prompt and a forward-mode pass over the top responses per E
                prompt (docs/math.md §9; about +85% of a probe of the default model).
            reference: with trainer beta != 0, the KL term's reference model (a local folder or cached HF id): the
                model full fine-tuning started from. None: TRL's own (a LoRA checkpoint's base with the adapter
                disabled; a full checkpoint's config.json _name_or_path if it is a local folder; model.model for
                a Lightning .ckpt; the probed model itself without a checkpoint).
        """
        super().__init__()
        self.settings = ProbeSettings(
            model, checkpoint, optimizer_state, update, learning_rate, G, G_E, entropy_target, estimator, trainer,
            sampling, generation, standard_error, eta_sweep, save_vectors, next_checkpoint, reference,
            entropy_coef_for_zero, breakdown_se, top_contributions_se,
        )  # fmt: skip
        self.save_hyperparameters()
        self.policy = None
        self.processor: SequenceProcessor | None = None
        self.loaded_checkpoint: LoadedCheckpoint | None = None
        self.probe: Probe | None = None
        self.rollout_checks: list[RolloutCheck] = []
        self.results_folder: Path | None = None  # where results.json goes, set by the callback that writes it

    def add_rollout_check(self, check: RolloutCheck) -> None:
        """Run `check` on every rollout before any of its gradient reaches the sums (BatchInvariants)."""
        if check not in self.rollout_checks:
            self.rollout_checks.append(check)

    def sample_identity(self) -> dict:
        """What this run's samples depend on (rollout_store.IDENTITY_FLAGS, and the sampling settings as resolved
        from the config and the checkpoint): saved with rollouts, and checked against them on a replay."""
        settings = self.settings
        return {
            "model": settings.model,
            "checkpoint": settings.checkpoint,
            "G": settings.G,
            "G_E": settings.G_E,
            "use_sequence_processor": settings.sampling.use_sequence_processor,
            "sampling": sampling_identity(self.processor.config),
        }

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        settings = self.settings
        if settings.checkpoint:
            self.loaded_checkpoint = load_checkpoint(
                settings.checkpoint, base_model=settings.model, require_optimizer_state=settings.update != "identity"
            )
            self.policy, tokenizer = self.loaded_checkpoint.model, self.loaded_checkpoint.tokenizer
        else:
            self.policy, tokenizer = load_model_and_tokenizer(settings.model)
        self.processor = SequenceProcessor(self.policy, tokenizer, settings.generation)

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy)
        require(
            self.settings.sampling.use_sequence_processor or self.trainer.world_size == 1,
            "model.sampling.use_sequence_processor false (the seed's legacy path) samples with torch's global "
            "generator, one process only: use the SequenceProcessor path (configs/sp.yaml) with several",
        )

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise ProbeConfigError(
                "the probe needs gradients but runs under torch.inference_mode: set trainer.inference_mode: false"
            )
        require(
            not self.settings.save_vectors or self.results_folder is not None,
            "model.save_vectors true, but no callback writes this run's results (nowhere to put "
            "vectors_probe{k}.safetensors): add callbacks.DeltaH1Logger to trainer.callbacks, as configs/sp.yaml does",
        )
        rewards = getattr(self.trainer.datamodule, "rewards", None)  # the DataModule's reward functions
        self.probe = build_probe(self.processor, self.settings, self.loaded_checkpoint, rewards)
        self.probe.checks = self.rollout_checks
        sequential = getattr(self.trainer.datamodule, "sequential_sampling", lambda: None)()
        if sequential is not None:  # data.target_rse
            require(self.settings.standard_error, "data.target_rse stops on the standard error: set model.standard_error true")
            require(
                not self.probe.update_batch.holds,
                "data.target_rse with trainer options that weigh every U token by the whole U batch (an entropy mask "
                "or bonus, masked truncated completions, a KL term) is not supported: set data.B_U to the size you want",
            )
            self.probe.sequential, self.probe.more_prompts = sequential, self.trainer.datamodule.extra_batches
        self.probe.collectives = Collectives(self.trainer.world_size)
        self.probe.results.info.world_size = self.trainer.world_size

    def predict_step(self, batch: PromptBatch) -> StepOutput:
        return self.probe.step(batch)
