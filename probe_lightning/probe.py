"""Probe: one run's probing, prompt batch by prompt batch, as plain Python that tests drive directly.

A probe = its E batches (entropy gradient X), then its U batches (update direction ∇J), then
`finish`: X̄ = ΣX / B_E, Ȳ from ∇J̄ = ΣY / B_U by the update geometry, δH₁ = η ⟨X̄, Ȳ⟩ (docs/math.md).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from probe_lightning import estimators
from probe_lightning.accumulator import NamedParams, ProbeSums
from probe_lightning.checkpoints import LoadedCheckpoint, trainable_parameters
from probe_lightning.config import SamplingConfig, Update, WeightingMode, require
from probe_lightning.data import PromptBatch
from probe_lightning.directional import directional_derivatives
from probe_lightning.models import DEFAULT_MODEL
from probe_lightning.optimizer_state import OptimizerState, load_optimizer_state, resolve_learning_rate
from probe_lightning.results import ProbeResult, RunInfo, RunResults, run_notes
from probe_lightning.rollout import Rollout, RolloutMaker
from probe_lightning.sequence_processor import GenerationConfig, SequenceProcessor, TeacherForcing
from probe_lightning.update import UpdateGeometry, resolve_update


@dataclass
class ProbeSettings:
    """The probe's settings (the LightningModule's arguments; see EntropyProbe for each), validated."""

    model: str | None = DEFAULT_MODEL
    checkpoint: str | None = None
    optimizer_state: str | None = None
    update: Update | None = None
    learning_rate: float | None = None
    G: int = 4
    G_E: int | None = None
    weighting_mode: WeightingMode = "dr_grpo"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    standard_error: bool = True

    def __post_init__(self):
        self.G_E = self.G if self.G_E is None else self.G_E
        require(self.G >= 1, f"model.G must be >= 1, got {self.G}")
        require(self.G_E >= 1, f"model.G_E must be >= 1, got {self.G_E}")
        require(
            self.learning_rate is None or self.learning_rate >= 0,
            f"model.learning_rate must be >= 0, got {self.learning_rate}",
        )
        require(
            not (self.checkpoint and self.optimizer_state),
            "model.checkpoint and model.optimizer_state are both set: a checkpoint carries its own optimizer state",
        )
        for name in ("checkpoint", "optimizer_state"):
            path = getattr(self, name)
            require(path is None or Path(path).exists(), f"model.{name}: no such file or folder {path!r}")
        has_state = bool(self.checkpoint or self.optimizer_state) and self.update != "identity"
        self.update = resolve_update(self.update, has_state)
        require(
            self.learning_rate is not None or self.checkpoint or self.optimizer_state,
            "model.learning_rate is not set and there is no checkpoint or optimizer_state to take it from",
        )
        require(self.model is not None or self.checkpoint, "model.model is null and there is no model.checkpoint")


class RolloutCheck(Protocol):
    """Checks of the batch contract; a failure raises, so a bad rollout never reaches the sums."""

    def check_rollout(self, rollout: Rollout, G: int) -> None:
        """Before teacher forcing: shapes, masks, lengths, advantages; G: responses asked for per prompt."""

    def check_scores(self, rollout: Rollout, scores: TeacherForcing) -> None:
        """Before a microbatch's gradient is added: its log-probs and entropies."""


@dataclass
class StepOutput:
    """What predict_step hands to callbacks."""

    rollout: Rollout
    seq_logprobs: torch.Tensor  # [B, G] detached
    token_entropies: torch.Tensor  # [B, G, R] detached
    results: RunResults  # the run so far (settings, finished probes, timings, memory)
    finished: ProbeResult | None = None  # the probe this batch ended, if it ended one


@dataclass
class ProbeVectors:
    """The last finished probe's vectors, parameter-shaped lists: X̄, ∇J̄ = ΣY / B_U and Ȳ."""

    x_bar: list[torch.Tensor]
    grad_j: list[torch.Tensor]
    y_bar: list[torch.Tensor]


class Probe:
    def __init__(
        self,
        processor: SequenceProcessor,
        rollouts: RolloutMaker,
        named_params: NamedParams,
        geometry: UpdateGeometry,
        weighting_mode: WeightingMode,
        standard_error: bool,
        results: RunResults,
    ):
        self.processor = processor
        self.make_rollout = rollouts
        self.named_params = named_params
        self.geometry = geometry
        self.weighting_mode = weighting_mode
        self.standard_error = standard_error
        self.results = results
        self.checks: list[RolloutCheck] = []
        self.sums = ProbeSums(named_params)
        self.rollouts: list[Rollout] = []  # this probe's, kept for the directional-derivative pass
        self.vectors: ProbeVectors | None = None

    def step(self, batch: PromptBatch) -> StepOutput:
        with self.results.timed("generate"):
            rollout = self.make_rollout(batch)
        for check in self.checks:
            check.check_rollout(rollout, self.make_rollout.num_samples(batch.role))
        seq_logprobs, token_entropies = self.accumulate(rollout)
        finished = self.finish(batch.probe_index) if batch.last_in_probe else None
        return StepOutput(rollout, seq_logprobs, token_entropies, self.results, finished)

    def rollout_loss(self, rollout: Rollout, seq_logprobs: torch.Tensor) -> torch.Tensor:
        """Per-prompt L_X (role E) or L_Y (role U), [B]; autograd of its sum is Σ X(p) or Σ ∇J(p)."""
        if rollout.role == "E":
            return estimators.entropy_loss(
                seq_logprobs, rollout.gen_lens, rollout.max_lengths, self.weighting_mode,
                self.processor.config.max_new_tokens,
            )  # fmt: skip
        return estimators.update_loss(seq_logprobs, rollout.advantages, rollout.max_lengths)

    def accumulate(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing with gradients, one microbatch of whole prompts at a time, into ΣX or ΣY."""
        seq_logprobs, entropies = [], []
        with self.results.timed(f"teacher_force_{'x' if rollout.role == 'E' else 'y'}"):
            batch = rollout.batch
            for rows in self.processor.microbatches(batch.num_prompts, batch.num_responses_per_prompt):
                micro = rollout.select(rows)
                tf = self.processor.teacher_force_logprobs(micro.batch, with_grad=True)
                for check in self.checks:
                    check.check_scores(micro, tf)
                with torch.enable_grad():
                    self.sums.add_gradient(rollout.role, self.rollout_loss(micro, tf.seq_logprobs).sum())
                seq_logprobs.append(tf.seq_logprobs.detach())
                entropies.append(tf.token_entropies)
        token_entropies = torch.cat(entropies)
        self.sums.count(rollout.role, rollout.rewards, token_entropies, rollout.batch.response_mask)
        if self.standard_error:
            self.rollouts.append(rollout)
        return torch.cat(seq_logprobs), token_entropies

    def finish(self, probe_index: int) -> ProbeResult:
        """X̄ = ΣX / B_E, Ȳ from ∇J̄ = ΣY / B_U by the update geometry, δH₁ = scale · ⟨X̄, Ȳ⟩ (float64)."""
        sums = self.sums
        B_E, B_U = sums.num_entropy_prompts, sums.num_update_prompts
        require(B_E > 0 and B_U > 0, f"probe {probe_index} ended with B_E={B_E}, B_U={B_U}: both must be >= 1")
        params = [p for _, p in self.named_params]
        with self.results.timed("finish_probe"):
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
            reward_mean=sums.reward_mean,
            entropy_mean=sums.entropy_mean,
        )
        if self.standard_error:
            with self.results.timed("standard_error"):
                directions = {"E": y_bar, "U": self.geometry.update_tangent(x_bar, grad_j, params)}
                derivatives = directional_derivatives(
                    self.processor, self.named_params, self.rollouts, directions, self.rollout_loss
                )
            (a_e, _), (b_u, update_ids) = derivatives["E"], derivatives["U"]
            result.delta_h1_se = estimators.plugin_standard_error(a_e, b_u, scale)
            result.update_prompt_contributions = dict(zip(update_ids, (scale * b_u / B_U).tolist()))
        self.vectors = ProbeVectors(x_bar, grad_j, y_bar)
        self.sums, self.rollouts = ProbeSums(self.named_params), []
        self.results.probes.append(result)
        return result


def build_probe(
    processor: SequenceProcessor, settings: ProbeSettings, checkpoint: LoadedCheckpoint | None = None
) -> Probe:
    """A Probe over the processor's model: its optimizer state, η and update geometry resolved once."""
    named_params = trainable_parameters(processor.model)
    require(named_params, f"model {settings.model!r} has no trainable parameters")
    if checkpoint is not None:
        optimizer = checkpoint.optimizer
    elif settings.optimizer_state:
        optimizer = load_optimizer_state(settings.optimizer_state, named_params, settings.update != "identity")
    else:
        optimizer = OptimizerState(None, None, "there is no checkpoint or optimizer_state to take it from")
    learning_rate, source = resolve_learning_rate(settings.learning_rate, optimizer)
    device = processor.device
    states = None if optimizer.adam_states is None else [s.to(device) for s in optimizer.adam_states]
    geometry = UpdateGeometry.build(settings.update, learning_rate, states)
    info = RunInfo(
        model=settings.model,
        learning_rate=learning_rate,
        learning_rate_source=source,
        update=geometry.kind,
        weighting_mode=settings.weighting_mode,
        G=settings.G,
        G_E=settings.G_E,
        use_sequence_processor=settings.sampling.use_sequence_processor,
        checkpoint=settings.checkpoint,
        checkpoint_format=checkpoint.format if checkpoint else None,
        global_step=checkpoint.global_step if checkpoint else None,
        notes=run_notes(geometry.kind, settings.G, settings.G_E),
    )
    rollouts = RolloutMaker(processor, settings.sampling.use_sequence_processor, settings.G, settings.G_E)
    return Probe(
        processor, rollouts, named_params, geometry, settings.weighting_mode, settings.standard_error, RunResults(info)
    )
