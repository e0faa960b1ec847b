"""EntropyProbe: the LightningModule that turns prompt batches into ΣX, ΣY and δH₁ (MATH.md).

One probe = the E batches (entropy gradient X), then the U batches (update direction ∇J), then
finish_probe(): X̄ = ΣX / B_E, Ȳ = P ⊙ ΣY / B_U, δH₁ = η ⟨X̄, Ȳ⟩ (or Ȳ = Δθ, the exact AdamW step).
"""

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch

from probe_lightning import estimators
from probe_lightning.config import ProbeConfigError, SamplingConfig, require
from probe_lightning.data import PromptBatch, format_prompt
from probe_lightning.models import DEFAULT_MODEL, load_model_and_tokenizer
from probe_lightning.checkpoints import LoadedCheckpoint, load_checkpoint
from probe_lightning.preconditioning import AdamParamState, load_adam_states
from probe_lightning.rollout import Rollout, legacy_generate, score_rollout, sequence_processor_lengths
from probe_lightning.sequence_processor import GenerationConfig, SequenceProcessor
from probe_lightning.update import PRECONDITIONERS, UPDATES, UpdateGeometry

log = logging.getLogger(__name__)


@contextmanager
def eager_attention(model):
    """Run `model` with the plain-PyTorch attention implementation inside the block."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


@dataclass
class ProbeResult:
    """One probe's numbers, as written to results.json."""

    probe_index: int
    delta_h1: float
    bars_dot: float  # ⟨X̄, Ȳ⟩
    x_norm: float
    y_norm: float
    B_E: int
    B_U: int
    reward_mean: float
    entropy_mean: float  # mean per-token entropy of q over all response tokens of the probe
    delta_h1_se: float | None = None  # plug-in standard error (MATH.md); None when not computed
    # η b_u / B_U per update prompt, keyed by prompt id: they sum to delta_h1 exactly
    update_prompt_contributions: dict[int, float] | None = None


@dataclass
class StepOutput:
    """What predict_step hands to callbacks: the rollout and its sequence log-probs."""

    rollout: Rollout
    seq_logprobs: torch.Tensor  # [B, G] detached
    token_entropies: torch.Tensor  # [B, G, R] detached


@dataclass
class _ProbeSums:
    sum_x: list[torch.Tensor]
    sum_y: list[torch.Tensor]
    num_entropy_prompts: int = 0
    num_update_prompts: int = 0
    reward_sum: float = 0.0
    num_responses: int = 0
    entropy_sum: float = 0.0
    num_tokens: int = 0
    rollouts: list[Rollout] = field(default_factory=list)  # kept for the standard-error pass


@dataclass
class RunInfo:
    """Everything results.json says besides the probe rows."""

    model: str
    learning_rate: float
    learning_rate_source: str
    preconditioner: str  # "adam" or "identity"
    update: str  # "identity", "adam_precondition" or "adamw_step" (probe_lightning/update.py)
    weighting_mode: str
    G: int
    G_E: int
    use_sequence_processor: bool
    checkpoint: str | None = None
    checkpoint_format: str | None = None  # hf_full, hf_lora or lightning
    global_step: int | None = None  # optimizer steps the checkpoint had taken
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, summed
    memory: dict[str, float] = field(default_factory=dict)  # MiB per phase, filled by MemoryMonitor


class EntropyProbe(pl.LightningModule):
    def __init__(
        self,
        model: str | None = DEFAULT_MODEL,
        checkpoint: str | None = None,
        optimizer_state: str | None = None,
        preconditioner: str | None = None,
        update: str = "adam_precondition",
        learning_rate: float | None = None,
        G: int = 4,
        G_E: int | None = None,
        weighting_mode: str = "dr_grpo",
        sampling: SamplingConfig = SamplingConfig(),
        generation: GenerationConfig = GenerationConfig(),
        standard_error: bool = True,
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
            preconditioner: adam (needs an optimizer state) or identity (P = 1, plain SGD geometry).
                None: adam when an optimizer state is given, identity otherwise.
            update: adam_precondition (Ȳ = P ∇J̄, the seed's geometry) or adamw_step (Ȳ = the exact
                AdamW step Δθ from the saved state; δH₁ = ⟨X̄, Δθ⟩).
            learning_rate: η. None: the lr the checkpoint's optimizer would use for its next step.
            G: responses per update (U) prompt; needs G >= 2, else every advantage is 0.
            G_E: responses per entropy (E) prompt; defaults to G. G_E = 1 drops the LOO baseline.
            weighting_mode: dr_grpo (the seed's default), per_token_avg or budget (MATH.md).
            standard_error: also compute δH₁'s plug-in standard error and the per-update-prompt
                contributions (one extra forward-mode pass over the probe's sequences).
        """
        super().__init__()
        G_E = G if G_E is None else G_E
        require(G >= 1, f"model.G must be >= 1, got {G}")
        require(G_E >= 1, f"model.G_E must be >= 1, got {G_E}")
        require(
            weighting_mode in estimators.WEIGHTING_MODES,
            f"model.weighting_mode must be one of {estimators.WEIGHTING_MODES}, got {weighting_mode!r}",
        )
        require(update in UPDATES, f"model.update must be one of {UPDATES}, got {update!r}")
        require(
            preconditioner in (None, *PRECONDITIONERS),
            f"model.preconditioner must be one of {PRECONDITIONERS} or null, got {preconditioner!r}",
        )
        require(learning_rate is None or learning_rate >= 0, f"model.learning_rate must be >= 0, got {learning_rate}")
        require(
            not (checkpoint and optimizer_state),
            "model.checkpoint and model.optimizer_state are both set: a checkpoint carries its own optimizer state",
        )
        for name, path in (("checkpoint", checkpoint), ("optimizer_state", optimizer_state)):
            require(path is None or Path(path).exists(), f"model.{name}: no such file or folder {path!r}")
        has_state = bool(checkpoint or optimizer_state) and preconditioner != "identity"
        require(
            preconditioner != "adam" or has_state,
            "model.preconditioner is adam but there is no model.checkpoint or model.optimizer_state to take it from",
        )
        require(
            update != "adamw_step" or has_state,
            "model.update adamw_step needs an Adam state: set model.checkpoint or model.optimizer_state",
        )
        require(
            learning_rate is not None or checkpoint or optimizer_state,
            "model.learning_rate is not set and there is no checkpoint or optimizer_state to take it from",
        )
        require(model is not None or checkpoint, "model.model is null and there is no model.checkpoint")
        self.save_hyperparameters()
        self.sampling = sampling
        self.generation = generation
        self.G, self.G_E = G, G_E
        self.policy = None
        self.processor: SequenceProcessor | None = None
        self.loaded_checkpoint: LoadedCheckpoint | None = None
        self.results: list[ProbeResult] = []
        self.info: RunInfo | None = None

    # ---- set-up ----

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.hparams.checkpoint:
            self.loaded_checkpoint = load_checkpoint(
                self.hparams.checkpoint,
                base_model=self.hparams.model,
                require_optimizer_state=self.hparams.preconditioner != "identity",
            )
            self.policy, tokenizer = self.loaded_checkpoint.model, self.loaded_checkpoint.tokenizer
        else:
            self.policy, tokenizer = load_model_and_tokenizer(self.hparams.model)
        self.processor = SequenceProcessor(self.policy, tokenizer, self.generation)

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise ProbeConfigError(
                "the probe needs gradients but runs under torch.inference_mode: set trainer.inference_mode: false"
            )
        self.named_params = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        require(self.named_params, f"model {self.hparams.model!r} has no trainable parameters")
        states, saved_lr, saved_lr_source = self._saved_optimizer_state()
        learning_rate, source = self.hparams.learning_rate, "config (model.learning_rate)"
        if learning_rate is None:
            require(saved_lr is not None, f"model.learning_rate is not set and {saved_lr_source}")
            learning_rate, source = saved_lr, saved_lr_source
        if learning_rate == 0:
            log.warning("η = 0 (from %s): δH₁ is 0 by construction, e.g. at the end of a linear decay", source)
        self.geometry = UpdateGeometry.build(
            self.hparams["update"],  # not hparams.update: that is dict.update
            learning_rate,
            None if states is None else [s.to(self.device) for s in states],
        )
        ckpt = self.loaded_checkpoint
        self.info = RunInfo(
            model=self.hparams.model,
            learning_rate=learning_rate,
            learning_rate_source=source,
            preconditioner="identity" if states is None else "adam",
            update=self.geometry.kind,
            weighting_mode=self.hparams.weighting_mode,
            G=self.G,
            G_E=self.G_E,
            use_sequence_processor=self.sampling.use_sequence_processor,
            checkpoint=self.hparams.checkpoint,
            checkpoint_format=ckpt.format if ckpt else None,
            global_step=ckpt.global_step if ckpt else None,
        )
        self._add_notes()
        self.sums = self._empty_sums()

    def _saved_optimizer_state(self) -> tuple[list[AdamParamState] | None, float | None, str]:
        """(Adam states aligned with the trainable parameters, or None; the saved next-step lr; its source)."""
        use_states = self.hparams.preconditioner != "identity"
        if self.loaded_checkpoint is not None:
            ckpt = self.loaded_checkpoint
            return ckpt.adam_states if use_states else None, ckpt.learning_rate, ckpt.learning_rate_source
        path = self.hparams.optimizer_state
        if not path:
            return None, None, "there is no checkpoint to take it from"
        states = load_adam_states(path, self.named_params)
        rates = sorted({s.lr for s in states})
        if len(rates) == 1:
            return states if use_states else None, rates[0], f"optimizer_state {path!r} param groups"
        return states if use_states else None, None, f"optimizer_state {path!r} has different group rates {rates}"

    def _add_notes(self) -> None:
        notes = self.info.notes
        if self.geometry.kind == "identity":
            notes.append("no optimizer state used: P = 1 (plain SGD geometry), not Adam's")
        if self.geometry.kind == "adamw_step":
            notes.append(
                "update adamw_step: δH₁ = ⟨X̄, Δθ⟩ includes AdamW's momentum drift; the update prompt "
                "contributions linearise Δθ at ∇J̄ and sum to ⟨X̄, D ∇J̄⟩, not to δH₁"
            )
        if self.G_E == 1:
            notes.append("G_E = 1: X uses no leave-one-out baseline (unbiased, higher variance)")
        if self.G == 1:
            notes.append("G = 1: every advantage is 0, so ∇J̄ = 0")

    def _empty_sums(self) -> _ProbeSums:
        zeros = lambda: [torch.zeros_like(p, dtype=torch.float32) for _, p in self.named_params]  # noqa: E731
        return _ProbeSums(sum_x=zeros(), sum_y=zeros())

    # ---- the probe ----

    def predict_step(self, batch: PromptBatch) -> StepOutput:
        rollout = self.make_rollout(batch)
        seq_logprobs, token_entropies = self.accumulate(rollout)
        if batch.last_in_probe:
            self.results.append(self.finish_probe(batch.probe_index))
        return StepOutput(rollout, seq_logprobs, token_entropies)

    def make_rollout(self, batch: PromptBatch) -> Rollout:
        """Generate G responses per prompt and score them (rewards, advantages, L_max)."""
        G = self.G_E if batch.role == "E" else self.G
        prompts = [format_prompt(self.processor.tokenizer, q) for q in batch.questions]
        self._check_prompt_lengths(prompts, batch.prompt_ids)
        with self.timed("generate"):
            if self.sampling.use_sequence_processor:
                sequences = self.processor.generate_batched(prompts, G)
                max_lengths = sequence_processor_lengths(sequences)
            else:
                sequences, max_lengths = legacy_generate(self.processor, prompts, G)
        with self.timed("reward"):
            return score_rollout(
                sequences, batch.answers, max_lengths, batch.role, batch.probe_index, batch.prompt_ids,
                self.sampling.use_sequence_processor,
            )

    def rollout_loss(self, rollout: Rollout, seq_logprobs: torch.Tensor) -> torch.Tensor:
        """Per-prompt L_X (role E) or L_Y (role U), [B]; autograd of its sum is Σ X(p) or Σ ∇J(p)."""
        if rollout.role == "E":
            return estimators.entropy_loss(
                seq_logprobs, rollout.gen_lens, rollout.max_lengths, self.hparams.weighting_mode,
                self.generation.max_new_tokens,
            )
        return estimators.update_loss(seq_logprobs, rollout.advantages, rollout.max_lengths)

    def accumulate(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing with gradients, one microbatch of whole prompts at a time, into ΣX or ΣY."""
        target = self.sums.sum_x if rollout.role == "E" else self.sums.sum_y
        seq_logprobs, entropies = [], []
        with self.timed(f"teacher_force_{'x' if rollout.role == 'E' else 'y'}"):
            for micro in self._microbatches(rollout):
                tf = self.processor.teacher_force_logprobs(
                    micro.batch, with_grad=True, tf_batch_size=micro.batch.num_sequences
                )
                with torch.enable_grad():
                    self._backward_into(self.rollout_loss(micro, tf.seq_logprobs).sum(), target)
                seq_logprobs.append(tf.seq_logprobs.detach())
                entropies.append(tf.token_entropies)
        seq_logprobs = torch.cat(seq_logprobs)
        token_entropies = torch.cat(entropies)
        self._count(rollout, token_entropies)
        return seq_logprobs, token_entropies

    def _backward_into(self, loss: torch.Tensor, sums: list[torch.Tensor]) -> None:
        """sums += ∇loss, each parameter's gradient added as soon as backward completes it, then dropped.

        As in a plain loss.backward() into existing .grad, the whole gradient never exists at once
        (torch.autograd.grad would return all of it together: one more model-sized buffer at the peak).
        The parameters' own .grad are left as they were.
        """
        params = [p for _, p in self.named_params]
        saved_grads = [p.grad for p in params]

        def add_into(total: torch.Tensor):
            def hook(param: torch.Tensor) -> None:
                total.add_(param.grad)
                param.grad = None

            return hook

        handles = [p.register_post_accumulate_grad_hook(add_into(total)) for p, total in zip(params, sums)]
        try:
            for p in params:
                p.grad = None
            loss.backward(inputs=params)
        finally:
            for handle in handles:
                handle.remove()
            for p, grad in zip(params, saved_grads):
                p.grad = grad

    def _microbatches(self, rollout: Rollout):
        """Whole prompts (all G responses, so the LOO baseline sees its group), ~tf_batch_size sequences."""
        prompts_per_microbatch = max(1, self.generation.tf_batch_size // rollout.batch.num_responses_per_prompt)
        for start in range(0, rollout.batch.num_prompts, prompts_per_microbatch):
            yield rollout.select(slice(start, start + prompts_per_microbatch))

    def _count(self, rollout: Rollout, token_entropies: torch.Tensor) -> None:
        sums = self.sums
        if self.hparams.standard_error:
            sums.rollouts.append(rollout)
        if rollout.role == "E":
            sums.num_entropy_prompts += rollout.batch.num_prompts
        else:
            sums.num_update_prompts += rollout.batch.num_prompts
        sums.reward_sum += rollout.rewards.sum().item()
        sums.num_responses += rollout.rewards.numel()
        sums.entropy_sum += token_entropies.sum().item()
        sums.num_tokens += int(rollout.batch.response_mask.sum().item())

    def finish_probe(self, probe_index: int) -> ProbeResult:
        """X̄ = ΣX / B_E, Ȳ from ∇J̄ = ΣY / B_U by the update geometry, δH₁ = scale · ⟨X̄, Ȳ⟩ (float64)."""
        sums = self.sums
        B_E, B_U = sums.num_entropy_prompts, sums.num_update_prompts
        require(B_E > 0 and B_U > 0, f"probe {probe_index} ended with B_E={B_E}, B_U={B_U}: both must be >= 1")
        params = [p for _, p in self.named_params]
        with self.timed("finish_probe"):
            # In place: the sums are replaced by fresh ones at the end, and model-sized copies cost time.
            x_bar = [s.div_(B_E) for s in sums.sum_x]
            grad_j = [s.div_(B_U) for s in sums.sum_y]
            y_bar = self.geometry.step_direction(grad_j, params)
            bars_dot = estimators.dot(x_bar, y_bar)
        scale = self.geometry.scale
        result = ProbeResult(
            probe_index=probe_index,
            delta_h1=scale * bars_dot,
            bars_dot=bars_dot,
            x_norm=estimators.norm(x_bar),
            y_norm=estimators.norm(y_bar),
            B_E=B_E,
            B_U=B_U,
            reward_mean=sums.reward_sum / max(sums.num_responses, 1),
            entropy_mean=sums.entropy_sum / max(sums.num_tokens, 1),
        )
        if self.hparams.standard_error:
            with self.timed("standard_error"):
                update_tangent = self.geometry.update_tangent(x_bar, grad_j, params)
                a_e, b_u, update_ids = self.directional_derivatives(y_bar, update_tangent)
            result.delta_h1_se = estimators.plugin_standard_error(a_e, b_u, scale)
            contributions = (scale * b_u / B_U).tolist()
            result.update_prompt_contributions = dict(zip(update_ids, contributions))
        # The last probe's vectors, e.g. for the real step θ + Δθ(η) of an η sweep.
        self.x_bar, self.y_bar, self.grad_j = x_bar, y_bar, grad_j
        self.sums = self._empty_sums()
        return result

    def directional_derivatives(
        self, y_bar: list[torch.Tensor], update_tangent: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """a_e = ⟨X(p_e), Ȳ⟩ per E prompt and b_u = ⟨v, ∇J(p_u)⟩ per U prompt (v = update_tangent, e.g.
        P ⊙ X̄), by forward-mode jvp.

        Each is the derivative of the prompt's own loss (L_X or L_Y) along a fixed direction, so one
        jvp per microbatch gives them all; no per-sample gradient is ever formed.
        """
        names = [n for n, _ in self.named_params]
        primals = tuple(p.detach() for _, p in self.named_params)
        a_e, b_u, update_ids = [], [], []
        # Forward-mode AD is not implemented for the fused CPU/GPU attention kernels.
        with eager_attention(self.policy):
            for rollout in self.sums.rollouts:
                direction = y_bar if rollout.role == "E" else update_tangent
                tangents = tuple(d.to(p.dtype) for d, p in zip(direction, primals))
                for micro in self._microbatches(rollout):

                    def loss(*params, micro=micro):
                        parameters = dict(zip(names, params))
                        tf = self.processor.teacher_force_logprobs(
                            micro.batch, tf_batch_size=micro.batch.num_sequences, parameters=parameters
                        )
                        return self.rollout_loss(micro, tf.seq_logprobs)

                    _, derivative = torch.func.jvp(loss, primals, tangents)
                    (a_e if rollout.role == "E" else b_u).append(derivative.double())
                    if rollout.role == "U":
                        update_ids.extend(micro.prompt_ids)
        return torch.cat(a_e), torch.cat(b_u), update_ids

    # ---- helpers ----

    @contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.info.timings[phase] = self.info.timings.get(phase, 0.0) + time.perf_counter() - start

    def _check_prompt_lengths(self, prompts: list[str], prompt_ids: list[int]) -> None:
        context = getattr(self.policy.config, "max_position_embeddings", None)
        if context is None:
            return
        lengths = [len(ids) for ids in self.processor.tokenizer(prompts, add_special_tokens=False).input_ids]
        for length, prompt_id in zip(lengths, prompt_ids):
            require(
                length + self.generation.max_new_tokens <= context,
                f"prompt {prompt_id} has {length} tokens + generation.max_new_tokens "
                f"{self.generation.max_new_tokens} > the model's context of {context} tokens",
            )

    def results_dict(self) -> dict:
        return {**asdict(self.info), "probes": [asdict(r) for r in self.results]}
