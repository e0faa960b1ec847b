"""Probe: one run's probing, prompt batch by prompt batch, as plain Python that tests drive directly.

A probe = its E batches (entropy gradient X), then its U batches (the trainer's ∇J), then `finish`:
X̄ = ΣX / B_E, ∇J̄ = ΣY / B_U (times the batch-level factors the trainer applies, then clipped), Ȳ from
∇J̄ by the update geometry, δH₁ = η ⟨X̄, Ȳ⟩ (docs/math.md).
"""

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from probe_lightning import estimators
from probe_lightning.accumulator import NamedParams, ProbeSums
from probe_lightning.config import require
from probe_lightning.contributions import ProbeContributions
from probe_lightning.data import PromptBatch
from probe_lightning.directional import directional_derivatives
from probe_lightning.distributed import Collectives
from probe_lightning.results import ProbeResult, RunResults
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
    contributions: ProbeContributions | None = None  # that probe's response and token tables, if computed


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
        # token_mean's X(p) weighs its two loss columns by plug-ins of the whole E batch (Ĥ_tok, Ê|y|): its E
        # rollouts are held, and teacher-forced with one backward each once the E batch has ended.
        self.hold_entropy_batch = settings.entropy_target == "token_mean"
        self.held: list[Rollout] = []
        self.x_weights = [1.0]  # X(p) = ∇ Σ_k x_weights[k] (entropy column k)
        self.sums = ProbeSums(named_params)
        # This probe's microbatches (E, then U) with their scores at θ: for the directional-derivative pass,
        # the contributions, the covariance proxy and the η sweep; and its V batch for the sweep.
        self.scored: list[tuple[Rollout, TeacherForcing]] = []
        self.evaluation: list[tuple[Rollout, TeacherForcing]] = []
        self.vectors: ProbeVectors | None = None
        self.contributions: ProbeContributions | None = None  # the finished probe's, until step hands them on
        self.collectives = Collectives()  # several processes: set by the LightningModule
        self.failure: Exception | None = None  # this process's error, held until the probe's end with several

    def step(self, batch: PromptBatch) -> StepOutput | None:
        """One prompt batch; on the probe's last, the finished probe. With several processes an error is
        held until every process reaches the probe's end, where all of them raise it."""
        output = self._unless_failed(lambda: self._work(batch))
        if not batch.last_in_probe:
            return output
        self.collectives.raise_any(self.failure)
        if self.hold_entropy_batch:
            self.x_weights = self._entropy_plug_ins()
            self._unless_failed(self._held_entropy_pass)
            self.collectives.raise_any(self.failure)
        finished = self.finish(batch.probe_index)
        contributions, self.contributions = self.contributions, None  # hand one probe's tables on, keep none
        return replace(output, finished=finished, contributions=contributions)

    def _unless_failed(self, work):
        """work(), unless this process has failed; with several processes its error is held, not raised."""
        if self.failure is not None:
            return None
        try:
            return work()
        except Exception as error:
            if not self.collectives.active:
                raise
            self.failure = error
            return None

    def _work(self, batch: PromptBatch) -> StepOutput:
        with self.results.timed("generate"):
            rollout = self.make_rollout(batch)
        for check in self.checks:
            check.check_rollout(rollout, self.make_rollout.num_samples(batch.role))
        if batch.role == "V":
            return self.evaluate(rollout)
        if batch.role == "E" and self.hold_entropy_batch:
            return self.hold(rollout)
        seq_logprobs, token_entropies = self.accumulate(rollout)
        return StepOutput(rollout, seq_logprobs, token_entropies, self.results)

    # ---- the per-sample losses ----

    def entropy_terms(self, rollout: Rollout, tf: TeacherForcing) -> torch.Tensor:
        """[B, G, K] per-response terms; their mean over G, weighted by x_weights and summed over K, has
        gradient X(p)."""
        return estimators.entropy_components(
            tf.token_logprobs, tf.token_entropies, tf.response_mask, rollout.max_lengths,
            self.settings.entropy_target, self.settings.estimator, self.processor.config.max_new_tokens,
        )  # fmt: skip

    def update_coefficients(self, rollout: Rollout) -> torch.Tensor:
        """[B, G, R] c: ∇ Σ c log q(y_t) is prompt p's piece of the trainer's ∇J̄, up to update_scale."""
        mask = rollout.batch.response_mask.float()
        G = rollout.batch.num_responses_per_prompt
        if self.trainer.loss_type == "seed":
            return (rollout.advantages / rollout.max_lengths[:, None] / G)[..., None] * mask
        # dapo and bnpo divide by the U batch's token count: 1 here, the count in update_scale.
        return token_coefficients(
            rollout.advantages, mask, "dapo" if self.trainer.loss_type in ("dapo", "bnpo") else self.trainer.loss_type,
            max_completion_length=self.trainer.max_completion_length, max_lengths=rollout.max_lengths,
            num_sequences=G, num_tokens=1.0,
        )  # fmt: skip

    def update_loss(self, rollout: Rollout, tf: TeacherForcing) -> torch.Tensor:
        """[B]: ∇ of prompt p's entry is its piece of ∇J̄, up to update_scale."""
        if self.trainer.loss_type == "seed":  # the seed's own loss function, summed as the seed summed it
            return estimators.update_loss(tf.seq_logprobs, rollout.advantages, rollout.max_lengths)
        return (self.update_coefficients(rollout) * tf.token_logprobs).sum((1, 2))

    def directional_outputs(self, rollout: Rollout, tf: TeacherForcing) -> torch.Tensor:
        """What the forward-mode pass differentiates: each E response's X term [B, G], each U token's log q."""
        if rollout.role == "E":
            terms = self.entropy_terms(rollout, tf)
            return terms @ terms.new_tensor(self.vectors.x_weights)
        return tf.token_logprobs

    # ---- accumulation and the finished probe ----

    def evaluate(self, rollout: Rollout) -> StepOutput:
        """An evaluation (V) batch: scored at θ and kept for the η sweep; it adds nothing to the sums."""
        with self.results.timed("eta_sweep"):
            tf = self.processor.teacher_force_logprobs(rollout.batch)
        for check in self.checks:
            check.check_scores(rollout, tf)
        self.evaluation.append((rollout, tf))
        return StepOutput(rollout, tf.seq_logprobs, tf.token_entropies, self.results)

    def hold(self, rollout: Rollout) -> StepOutput:
        """A token_mean E rollout: counted now (its entropies as generation computed them, else from teacher
        forcing without gradients), added to ΣX when the E batch has ended (`_held_entropy_pass`)."""
        batch = rollout.batch
        token_logprobs, token_entropies = batch.token_logprobs, batch.token_entropies
        if token_entropies is None:  # model.generate (the legacy path) or rollouts saved without them
            with self.results.timed("teacher_force_x"):
                tf = self.processor.teacher_force_logprobs(batch)
            token_logprobs, token_entropies = tf.token_logprobs, tf.token_entropies
        self.sums.count("E", rollout.rewards, token_entropies, batch.response_mask)
        self.held.append(rollout)
        return StepOutput(rollout, token_logprobs.sum(-1), token_entropies, self.results)

    def _entropy_plug_ins(self) -> list[float]:
        """token_mean's column weights from the whole E batch's counts, summed over processes (every process
        meets here, failed or not)."""
        e = self.sums.counts["E"]
        totals = torch.tensor([e.entropy_sum, e.tokens, e.responses], dtype=torch.float64)
        self.collectives.sum_([totals])
        entropy_sum, tokens, responses = totals.tolist()
        if responses == 0 or tokens == 0:  # no E response, or only empty ones: finish says which
            return [1.0, 0.0]
        return estimators.token_mean_weights(entropy_sum, round(tokens), round(responses))

    def _held_entropy_pass(self) -> None:
        held, self.held = self.held, []
        for rollout in held:
            self.accumulate(rollout, count=False)

    def accumulate(self, rollout: Rollout, count: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing with gradients, one microbatch of whole prompts at a time, into ΣX or ΣY.
        count: add the rollout to the counts (a held E rollout was counted when it came)."""
        scored = []
        with self.results.timed(f"teacher_force_{'x' if rollout.role == 'E' else 'y'}"):
            batch = rollout.batch
            for rows in self.processor.microbatches(batch.num_prompts, batch.num_responses_per_prompt):
                micro = rollout.select(rows)
                tf = self.processor.teacher_force_logprobs(micro.batch, with_grad=True)
                for check in self.checks:
                    check.check_scores(micro, tf)
                with torch.enable_grad():
                    if rollout.role == "E":
                        columns = self.entropy_terms(micro, tf).mean(1).sum(0)
                        self.sums.add_gradient(self.sums.sum_x, columns @ columns.new_tensor(self.x_weights))
                    else:
                        self.sums.add_gradient(self.sums.sum_y, self.update_loss(micro, tf).sum())
                scored.append((micro, tf.detached()))
        self.scored.extend(scored)
        token_entropies = torch.cat([tf.token_entropies for _, tf in scored])
        if count:
            self.sums.count(rollout.role, rollout.rewards, token_entropies, rollout.batch.response_mask)
        return torch.cat([tf.seq_logprobs for _, tf in scored]), token_entropies

    def finish(self, probe_index: int) -> ProbeResult:
        """X̄, ∇J̄ and Ȳ from the sums, δH₁ = scale · ⟨X̄, Ȳ⟩ (float64); the standard error, contributions,
        covariance proxy and η sweep as asked."""
        sums = self.sums
        sums.all_reduce(self.collectives)
        e, u = sums.counts["E"], sums.counts["U"]
        B_E, B_U = e.prompts, u.prompts
        require(B_E > 0 and B_U > 0, f"probe {probe_index} ended with B_E={B_E}, B_U={B_U}: both must be >= 1")
        params = [p for _, p in self.named_params]
        with self.results.timed("finish_probe"):
            # In place: the sums are replaced by fresh ones at the end, and model-sized copies cost time.
            x_bar = [s.div_(B_E) for s in sums.sum_x]
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
            covariance=self._covariance(),
        )
        self.vectors = ProbeVectors(x_bar, grad_j, y_bar, self.x_weights, batch_scale * clip)
        contributions = None
        if self.settings.standard_error:
            with self.results.timed("standard_error"):
                contributions = self._contributions(result, params)
        if self.settings.eta_sweep:
            entropy_batch = [(r, tf) for r, tf in self.scored if r.role == "E"]
            with self.results.timed("eta_sweep"):
                result.eta_sweep, result.eta_sweep_summary = eta_sweep(
                    self.processor, self.named_params, self.geometry, x_bar, grad_j, self.settings.eta_sweep,
                    self.evaluation, entropy_batch, self.settings.entropy_target, result.covariance,
                    self.collectives.gather,
                )  # fmt: skip
        self.sums, self.scored, self.evaluation = ProbeSums(self.named_params), [], []
        self.results.probes.append(result)
        self.contributions = contributions
        return result

    def _contributions(self, result: ProbeResult, params: list[torch.Tensor]) -> ProbeContributions:
        """One forward-mode pass: a_e per E prompt, b_u per U prompt (the plug-in SE), and every sample's
        share of δH₁: η a_e / B_E over E responses, d_{u,g,t} = η c ⟨v, ∇log q(y_t)⟩ / B_U over U tokens."""
        vectors, scale = self.vectors, self.geometry.scale
        B_E, B_U = result.B_E, result.B_U
        directions = {"E": vectors.y_bar, "U": self.geometry.update_tangent(vectors.x_bar, vectors.grad_j, params)}
        micros = [micro for micro, _ in self.scored]
        derivatives = directional_derivatives(
            self.processor, self.named_params, micros, directions, self.directional_outputs
        )
        local = ProbeContributions(result.probe_index)
        a_e, b_u, update_ids, entropy_ids = [], [], [], []
        for (micro, derivative), (_, tf) in zip(derivatives, self.scored):
            G = micro.batch.num_responses_per_prompt
            if micro.role == "E":
                a_e.append(derivative.mean(1))
                entropy_ids.extend(micro.prompt_ids)
                per_response, per_token = scale * derivative / (G * B_E), None
            else:
                token_b = self.update_coefficients(micro).double() * vectors.update_scale * derivative
                b_u.append(token_b.sum((1, 2)))
                update_ids.extend(micro.prompt_ids)
                per_token = scale * token_b / B_U
                per_response = per_token.sum(-1)
            local.add_rollout(
                micro, per_response, per_token, tf.token_logprobs, tf.token_entropies, self.processor.tokenizer
            )
        shares = self.collectives.gather((torch.cat(a_e).cpu(), entropy_ids, torch.cat(b_u).cpu(), update_ids, local))
        a_e, entropy_ids, b_u, update_ids = (
            torch.cat([s[0] for s in shares]), [i for s in shares for i in s[1]],
            torch.cat([s[2] for s in shares]), [i for s in shares for i in s[3]],
        )  # fmt: skip
        contributions = ProbeContributions.merge([s[4] for s in shares])
        result.delta_h1_se = estimators.plugin_standard_error(a_e, b_u, scale)
        result.delta_h1_se_parts = estimators.standard_error_parts(a_e, b_u, scale)
        result.update_prompt_contributions = dict(zip(update_ids, (scale * b_u / B_U).tolist()))
        result.entropy_prompt_contributions = dict(zip(entropy_ids, (scale * a_e / B_E).tolist()))
        result.contributions_add_up_to = "the linearised step" if self.geometry.kind == "adamw_step" else "delta_h1"
        result.top_responses = contributions.top_responses()
        result.top_tokens = contributions.top_tokens()
        result.counterfactuals = contributions.counterfactuals()
        return contributions

    def _covariance(self) -> float:
        """Cov(log π(y_t), A(y_t)) over the U batch's response tokens (the covariance proxy's)."""
        update = [(micro, tf) for micro, tf in self.scored if micro.role == "U"]
        masks = [tf.response_mask.bool() for _, tf in update]
        log_q = torch.cat([tf.token_logprobs[m] for (_, tf), m in zip(update, masks)]).double().cpu()
        advantage = torch.cat([micro.advantages[..., None].expand_as(m)[m] for (micro, _), m in zip(update, masks)])
        shares = self.collectives.gather((log_q, advantage.double().cpu()))
        return covariance_proxy(torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares]))

    def _batch_scale(self, tokens_per_prompt: float) -> float:
        """The trainer's normalisers that need the whole U batch: dapo/bnpo's token count (the U batch as
        one generation batch: B_U / N_tok) and scale_rewards batch's 1 / (std of all rewards + 1e-4)."""
        factor = 1.0 / tokens_per_prompt if self.trainer.loss_type in ("dapo", "bnpo") else 1.0
        if self.trainer.scale_rewards == "batch" and self.settings.G > 1:  # with G = 1 every A is 0
            factor /= torch.cat(self.sums.update_rewards).std().item() + STD_EPS
        return factor
