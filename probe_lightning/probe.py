"""Probe: one run's probing, prompt batch by prompt batch, as plain Python that tests drive directly.

A probe = its E batches (entropy gradient X), then its U batches (the trainer's ∇J), then `finish`:
X̄ = ΣX / B_E, ∇J̄ = ΣY / B_U (times the batch-level factors the trainer applies, then clipped), Ȳ from
∇J̄ by the update geometry, δH₁ = η ⟨X̄, Ȳ⟩ (docs/math.md).
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from probe_lightning import estimators
from probe_lightning.accumulator import NamedParams, ProbeSums
from probe_lightning.checkpoints import LoadedCheckpoint, trainable_parameters
from probe_lightning.config import require
from probe_lightning.data import PromptBatch
from probe_lightning.directional import directional_derivatives
from probe_lightning.optimizer_state import OptimizerState, load_optimizer_state, resolve_learning_rate
from probe_lightning.results import ProbeResult, RunInfo, RunResults, run_notes
from probe_lightning.rollout import Rollout, RolloutMaker
from probe_lightning.sequence_processor import SequenceProcessor, TeacherForcing
from probe_lightning.settings import ProbeSettings
from probe_lightning.trainer_loss import STD_EPS, clip_factor, token_coefficients
from probe_lightning.true_change import covariance_proxy, eta_sweep
from probe_lightning.update import UpdateGeometry


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
    """The last finished probe: X̄, ∇J̄ (scaled and clipped as the trainer would), Ȳ, and the scalars that
    turn a prompt's loss into its share of them."""

    x_bar: list[torch.Tensor]
    grad_j: list[torch.Tensor]
    y_bar: list[torch.Tensor]
    x_weights: list[float]  # X(p) = Σ_k x_weights[k] ∇(entropy column k)
    update_scale: float  # ∇J(p) = update_scale · ∇(update piece): batch normalisers × clip factor


class Probe:
    def __init__(
        self,
        processor: SequenceProcessor,
        rollouts: RolloutMaker,
        named_params: NamedParams,
        geometry: UpdateGeometry,
        settings: ProbeSettings,
        results: RunResults,
    ):
        self.processor = processor
        self.make_rollout = rollouts
        self.named_params = named_params
        self.geometry = geometry
        self.settings = settings
        self.trainer = settings.trainer_settings
        self.results = results
        self.checks: list[RolloutCheck] = []
        self.entropy_columns = 2 if settings.entropy_target == "token_mean" else 1
        self.sums = ProbeSums(named_params, self.entropy_columns)
        self.rollouts: list[Rollout] = []  # this probe's, kept for the directional-derivative pass
        # With an η sweep: the V batch and the E batch with their scores at θ, for the true change.
        self.evaluation: list[tuple[Rollout, TeacherForcing]] = []
        self.entropy_scored: list[tuple[Rollout, TeacherForcing]] = []
        self.update_tokens: list[tuple[torch.Tensor, torch.Tensor]] = []  # (log q, A) of U tokens: Cov proxy
        self.vectors: ProbeVectors | None = None

    def step(self, batch: PromptBatch) -> StepOutput:
        with self.results.timed("generate"):
            rollout = self.make_rollout(batch)
        for check in self.checks:
            check.check_rollout(rollout, self.make_rollout.num_samples(batch.role))
        if batch.role == "V":
            return self.evaluate(rollout)
        seq_logprobs, token_entropies = self.accumulate(rollout)
        finished = self.finish(batch.probe_index) if batch.last_in_probe else None
        return StepOutput(rollout, seq_logprobs, token_entropies, self.results, finished)

    # ---- the per-prompt losses ----

    def entropy_loss(self, rollout: Rollout, tf: TeacherForcing) -> torch.Tensor:
        """[B, K]: the gradient of column k, weighted by x_weights and summed, is X(p)."""
        return estimators.entropy_components(
            tf.token_logprobs, tf.token_entropies, tf.response_mask, rollout.max_lengths,
            self.settings.entropy_target, self.settings.estimator, self.processor.config.max_new_tokens,
        )  # fmt: skip

    def update_loss(self, rollout: Rollout, tf: TeacherForcing) -> torch.Tensor:
        """[B]: ∇ of prompt p's entry is its piece of the trainer's ∇J̄, up to the scalar update_scale."""
        loss_type = self.trainer.loss_type
        if loss_type == "seed":
            return estimators.update_loss(tf.seq_logprobs, rollout.advantages, rollout.max_lengths)
        G = rollout.batch.num_responses_per_prompt
        # dapo and bnpo divide by the U batch's token count: 1 here, the count in update_scale.
        coefficients = token_coefficients(
            rollout.advantages, tf.response_mask, "dapo" if loss_type in ("dapo", "bnpo") else loss_type,
            max_completion_length=self.trainer.max_completion_length, max_lengths=rollout.max_lengths,
            num_sequences=G, num_tokens=1.0,
        )  # fmt: skip
        return (coefficients * tf.token_logprobs).sum((1, 2))

    def prompt_loss(self, rollout: Rollout, tf: TeacherForcing) -> torch.Tensor:
        """[B] per-prompt losses whose gradients are X(p) (E) or ∇J(p) (U) of the finished probe."""
        if rollout.role == "E":
            columns = self.entropy_loss(rollout, tf).unbind(-1)
            return sum(weight * column for weight, column in zip(self.vectors.x_weights, columns))
        return self.update_loss(rollout, tf) * self.vectors.update_scale

    # ---- accumulation and the finished probe ----

    def evaluate(self, rollout: Rollout) -> StepOutput:
        """An evaluation (V) batch: scored at θ and kept for the η sweep; it adds nothing to the sums."""
        with self.results.timed("eta_sweep"):
            tf = self.processor.teacher_force_logprobs(rollout.batch)
        for check in self.checks:
            check.check_scores(rollout, tf)
        self.evaluation.append((rollout, tf))
        return StepOutput(rollout, tf.seq_logprobs, tf.token_entropies, self.results)

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
                    if rollout.role == "E":
                        columns = self.entropy_loss(micro, tf).sum(0)
                        for k, sums in enumerate(self.sums.sum_x):
                            self.sums.add_gradient(sums, columns[k], retain_graph=k + 1 < len(columns))
                    else:
                        self.sums.add_gradient(self.sums.sum_y, self.update_loss(micro, tf).sum())
                scores = tf.detached()
                if rollout.role == "E" and self.settings.eta_sweep:
                    self.entropy_scored.append((micro, scores))
                if rollout.role == "U":
                    mask = scores.response_mask.bool()
                    advantage = micro.advantages[..., None].expand_as(mask)
                    self.update_tokens.append((scores.token_logprobs[mask].double(), advantage[mask].double()))
                seq_logprobs.append(scores.seq_logprobs)
                entropies.append(scores.token_entropies)
        token_entropies = torch.cat(entropies)
        self.sums.count(rollout.role, rollout.rewards, token_entropies, rollout.batch.response_mask)
        if self.settings.standard_error:
            self.rollouts.append(rollout)
        return torch.cat(seq_logprobs), token_entropies

    def finish(self, probe_index: int) -> ProbeResult:
        """X̄, ∇J̄ and Ȳ from the sums, δH₁ = scale · ⟨X̄, Ȳ⟩ (float64); the standard error if asked."""
        sums = self.sums
        e, u = sums.counts["E"], sums.counts["U"]
        B_E, B_U = e.prompts, u.prompts
        require(B_E > 0 and B_U > 0, f"probe {probe_index} ended with B_E={B_E}, B_U={B_U}: both must be >= 1")
        params = [p for _, p in self.named_params]
        with self.results.timed("finish_probe"):
            # In place: the sums are replaced by fresh ones at the end, and model-sized copies cost time.
            if self.entropy_columns == 1:
                x_weights = [1.0]
                x_bar = [s.div_(B_E) for s in sums.sum_x[0]]
            else:
                x_weights = estimators.token_mean_weights(e.entropy_sum, e.tokens, e.responses)
                x_bar = [a.mul_(x_weights[0] / B_E).add_(b, alpha=x_weights[1] / B_E) for a, b in zip(*sums.sum_x)]
            grad_j = [s.div_(B_U) for s in sums.sum_y]
            batch_scale = self._batch_scale(u.tokens / B_U)
            if batch_scale != 1.0:
                grad_j = [g.mul_(batch_scale) for g in grad_j]
            clip = clip_factor(estimators.norm(grad_j), self.trainer.max_grad_norm)
            if clip != 1.0:
                grad_j = [g.mul_(clip) for g in grad_j]
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
            clip_factor=clip,
            mixed_update_fraction=u.mixed_prompts / B_U,
        )
        self.vectors = ProbeVectors(x_bar, grad_j, y_bar, x_weights, batch_scale * clip)
        if self.settings.standard_error:
            with self.results.timed("standard_error"):
                directions = {"E": y_bar, "U": self.geometry.update_tangent(x_bar, grad_j, params)}
                derivatives = directional_derivatives(
                    self.processor, self.named_params, self.rollouts, directions, self.prompt_loss
                )
            (a_e, _), (b_u, update_ids) = derivatives["E"], derivatives["U"]
            result.delta_h1_se = estimators.plugin_standard_error(a_e, b_u, scale)
            result.delta_h1_se_parts = estimators.standard_error_parts(a_e, b_u, scale)
            result.update_prompt_contributions = dict(zip(update_ids, (scale * b_u / B_U).tolist()))
        log_q, advantage = (torch.cat(column) for column in zip(*self.update_tokens))
        result.covariance = covariance_proxy(log_q, advantage)
        if self.settings.eta_sweep:
            with self.results.timed("eta_sweep"):
                result.eta_sweep, result.eta_sweep_summary = eta_sweep(
                    self.processor, self.named_params, self.geometry, x_bar, grad_j, self.settings.eta_sweep,
                    self.evaluation, self.entropy_scored, self.settings.entropy_target, result.covariance,
                )  # fmt: skip
        self.sums, self.rollouts = ProbeSums(self.named_params, self.entropy_columns), []
        self.evaluation, self.entropy_scored, self.update_tokens = [], [], []
        self.results.probes.append(result)
        return result

    def _batch_scale(self, tokens_per_prompt: float) -> float:
        """The trainer's normalisers that need the whole U batch: dapo/bnpo's token count (the U batch as
        one generation batch: B_U / N_tok) and scale_rewards batch's 1 / (std of all rewards + 1e-4)."""
        factor = 1.0 / tokens_per_prompt if self.trainer.loss_type in ("dapo", "bnpo") else 1.0
        if self.trainer.scale_rewards == "batch" and self.settings.G > 1:  # with G = 1 every A is 0
            factor /= torch.cat(self.sums.update_rewards).std().item() + STD_EPS
        return factor


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
    trainer = settings.trainer_settings
    info = RunInfo(
        model=settings.model,
        learning_rate=learning_rate,
        learning_rate_source=source,
        update=geometry.kind,
        entropy_target=settings.entropy_target,
        estimator=settings.estimator,
        trainer={name: {"value": value, "source": settings.trainer_sources[name]}
                 for name, value in vars(trainer).items()},
        G=settings.G,
        G_E=settings.G_E,
        use_sequence_processor=settings.sampling.use_sequence_processor,
        checkpoint=settings.checkpoint,
        checkpoint_format=checkpoint.format if checkpoint else None,
        global_step=checkpoint.global_step if checkpoint else None,
        notes=run_notes(
            geometry.kind, settings.G, settings.G_E, settings.entropy_target, settings.estimator, trainer.loss_type
        ),
    )
    rollouts = RolloutMaker(
        processor, settings.sampling.use_sequence_processor, settings.G, settings.G_E, trainer.scale_rewards
    )
    return Probe(processor, rollouts, named_params, geometry, settings, RunResults(info))
