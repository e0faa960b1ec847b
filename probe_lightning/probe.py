"""Probe: one run's probing, prompt batch by prompt batch, as plain Python that tests drive directly.

A probe = its E batches, sampled and held; its U batches, teacher-forced into ΣY (the trainer's ∇J; held
until the probe's end when the trainer's options need the whole U batch first, update_batch.py);
then `finish`: ∇J̄ = ΣY / B_U (times the batch-level factors the trainer applies, then clipped), Ȳ from
∇J̄ by the update geometry; the held E batch teacher-forced into ΣX (the entropy gradient X), now that
token_mean's plug-ins and Ȳ are known; X̄ = ΣX / B_E, δH₁ = η ⟨X̄, Ȳ⟩ (docs/math.md).
"""

import math
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from probe_lightning import estimators
from probe_lightning.accumulator import NamedParams, ProbeSums
from probe_lightning.breakdown import BreakdownErrors
from probe_lightning.config import require
from probe_lightning.contributions import ProbeContributions
from probe_lightning.data import PromptBatch
from probe_lightning.directional import directional_derivatives
from probe_lightning.distributed import Collectives
from probe_lightning.entropy_coef import CoefficientStep, entropy_coef_for_zero
from probe_lightning.next_checkpoint import NextCheckpoint, step_agreement
from probe_lightning.progress import phase_bar
from probe_lightning.results import ENTROPY_COEF_FOR_ZERO, ProbeResult, RunResults, timed_into
from probe_lightning.rollout import Rollout, RolloutMaker
from probe_lightning.sequential import SequentialSampling
from probe_lightning.sequence_processor import SequenceProcessor, TeacherForcing
from probe_lightning.settings import ProbeSettings
from probe_lightning.trainer_loss import STD_EPS, TOKEN_COUNT_LOSSES, check_router_loss, clip_factor, nanstd
from probe_lightning.true_change import covariance_proxy, eta_sweep, score, true_change
from probe_lightning.update import UpdateGeometry
from probe_lightning.update_batch import UpdateBatch
from probe_lightning.vectors import block_shares, parameter_shares


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
    vectors: "ProbeVectors | None" = None  # that probe's vectors, when model.save_vectors asks for them


@dataclass
class ProbeVectors:
    """The last finished probe: X̄, ∇J̄ (scaled and clipped as the trainer would), Ȳ, and the scalars that
    turn a prompt's loss into its share of them."""

    keys: list[str]  # each parameter's key in the checkpoint's weights file (vectors.weight_key)
    x_bar: list[torch.Tensor]
    grad_j: list[torch.Tensor]
    y_bar: list[torch.Tensor]
    x_weights: list[float]  # X(p) = Σ_k x_weights[k] ∇(entropy column k)
    update_scale: float  # ∇J(p) = update_scale · ∇(update piece): batch normalisers × clip factor
    step_scale: float  # Δθ = step_scale · Ȳ: η, or 1 for adamw_step (Ȳ is Δθ)

    @property
    def grad_loss(self) -> list[torch.Tensor]:
        """The trainer's loss gradient as its optimizer receives it (normalised, scaled, clipped): −∇J̄."""
        return [-g for g in self.grad_j]

    @property
    def update(self) -> list[torch.Tensor]:
        """Δθ of the predicted step at the run's η: θ_next − θ."""
        return self.y_bar if self.step_scale == 1.0 else [self.step_scale * y for y in self.y_bar]


class Probe(BreakdownErrors):
    def __init__(
        self,
        processor: SequenceProcessor,
        rollouts: RolloutMaker,
        named_params: NamedParams,
        geometry: UpdateGeometry,
        settings: ProbeSettings,
        results: RunResults,
        weight_keys: list[str] | None = None,
        next_checkpoint: NextCheckpoint | None = None,
    ):
        self.processor = processor
        self.make_rollout = rollouts
        self.named_params = named_params
        self.weight_keys = weight_keys or [name for name, _ in named_params]
        self.next_checkpoint = next_checkpoint
        self.geometry = geometry
        self.settings = settings
        self.trainer = settings.trainer_settings
        self.results = results
        self.checks: list[RolloutCheck] = []
        # The E rollouts are held (token ids) until the probe's end: token_mean's X(p) weighs its two loss
        # columns by plug-ins of the whole E batch (Ĥ_tok, Ê|y|), and with Ȳ known each E prompt's
        # a_e = ⟨X(e), Ȳ⟩ comes with its own backward, as a dot product.
        self.held: list[Rollout] = []
        # The U rollouts, held likewise when the trainer's options need the whole U batch before any coefficient
        # (an entropy mask, an entropy bonus, truncated completions masked, a KL term).
        self.update_batch = UpdateBatch(processor, settings)
        check_router_loss(self.trainer, processor.model.config)
        self.x_weights = [1.0]  # X(p) = ∇ Σ_k x_weights[k] (entropy column k)
        # (E prompt id, {direction: ⟨X(e), direction⟩}): a_e along Ȳ (the standard error), along Δθ_real
        self.entropy_derivatives: list[tuple[int, dict[str, float]]] = []
        # per E prompt, ⟨X(e), Ȳ⟩ parameter tensor by tensor: the E side of the parameter and block shares' SEs
        self.entropy_parameter_terms: list[torch.Tensor] = []
        # with the standard error: g ↦ (∂Ȳ/∂∇J) g at the probe's ∇J̄ (UpdateGeometry.step_derivative)
        self.step_derivative: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
        # with the standard error: the counterfactual token selections, a keep mask per U response (_token_selections)
        self.selections: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        # With the standard error and a TRL loss, ΣB too: the entropy bonus's gradient per unit coefficient, for the
        # entropy_coef that holds the entropy steady (entropy_coef.py)
        self.with_bonus_sum = (
            settings.standard_error and settings.entropy_coef_for_zero and self.trainer.loss_type != "seed"
        )
        self.sums = ProbeSums(named_params, bonus=self.with_bonus_sum)
        # This probe's microbatches (U, then E) with their scores at θ: for the directional-derivative pass,
        # the contributions, the covariance proxy and the η sweep; and its V batch for the sweep.
        self.scored: list[tuple[Rollout, TeacherForcing]] = []
        self.evaluation: list[tuple[Rollout, TeacherForcing]] = []
        self.vectors: ProbeVectors | None = None
        self.contributions: ProbeContributions | None = None  # the finished probe's, until step hands them on
        self.collectives = Collectives()  # several processes: set by the LightningModule
        self.failure: Exception | None = None  # this process's error, held until the probe's end with several
        # Seconds this probe spent on each role's prompts (sampling, teacher forcing, their SE pass): what one more
        # E or U prompt costs, for the sizes that would resolve δH₁ (estimators.sizes_for_target).
        self.role_seconds: dict[str, float] = {}
        # data.target_rse: the stopping rule, and where more of probe k's prompts come from (n_E, n_U -> batches)
        self.sequential: SequentialSampling | None = None
        self.more_prompts: Callable[[int, int, int], list[PromptBatch]] | None = None

    def step(self, batch: PromptBatch) -> StepOutput | None:
        """One prompt batch; on the probe's last, the finished probe. With several processes an error is
        held until every process reaches the probe's end, where all of them raise it."""
        with self._charged(batch.role):
            output = self._unless_failed(lambda: self._work(batch))
        if not batch.last_in_probe:
            return output
        self.collectives.raise_any(self.failure)
        finished = self.finish(batch.probe_index)
        contributions, self.contributions = self.contributions, None  # hand one probe's tables on, keep none
        vectors = self.vectors if self.settings.save_vectors else None
        return replace(output, finished=finished, contributions=contributions, vectors=vectors)

    def _charged(self, role: str):
        """The time inside, added to role's seconds."""
        return timed_into(self.role_seconds, role)

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
        if batch.role == "E" or self.update_batch.holds:
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

    def update_coefficients(self, rollout: Rollout, token_logprobs: torch.Tensor | None = None) -> torch.Tensor:
        """[B, G, R] c of the log-probs: prompt p's piece of the trainer's ∇J̄ is ∇ Σ c log q(y_t) (plus the
        entropy bonus's: UpdateBatch.coefficients), up to update_scale. token_logprobs: log q at θ (a KL term's)."""
        return self.update_batch.coefficients(rollout, token_logprobs)[0]

    def update_loss(self, rollout: Rollout, tf: TeacherForcing) -> torch.Tensor:
        """[B]: ∇ of prompt p's entry is its piece of ∇J̄, up to update_scale."""
        if self.trainer.loss_type == "seed":  # the seed's own loss function, summed as the seed summed it
            return estimators.update_loss(tf.seq_logprobs, rollout.advantages, rollout.max_lengths)
        coefficients, bonus = self.update_batch.coefficients(rollout, tf.token_logprobs.detach())
        loss = (coefficients * tf.token_logprobs).sum((1, 2))
        return loss if bonus is None else loss + (bonus * tf.token_entropies).sum((1, 2))

    def entropy_loss(self, rollout: Rollout, tf: TeacherForcing) -> torch.Tensor:
        """The E microbatch's loss: its gradient is Σ_p X(p) over the microbatch's prompts."""
        columns = self.entropy_terms(rollout, tf).mean(1).sum(0)
        return columns @ columns.new_tensor(self.x_weights)

    @property
    def has_bonus_term(self) -> bool:
        """Whether U tokens' H_t enter the trainer's loss (an entropy bonus of a TRL loss type)."""
        return self.trainer.loss_type != "seed" and self.trainer.entropy_bonus != 0

    def bonus_loss(self, rollout: Rollout, tf: TeacherForcing) -> torch.Tensor:
        """[B]: ∇ of prompt p's entry is its piece of g_b, the entropy bonus's gradient at coefficient 1, up to
        bonus_scale."""
        return (self.update_batch.bonus_coefficients(rollout) * tf.token_entropies).sum((1, 2))

    # ---- accumulation and the finished probe ----

    def evaluate(self, rollout: Rollout) -> StepOutput:
        """An evaluation (V) batch: scored at θ and kept for the true change (the η sweep, the next checkpoint);
        it adds nothing to the sums."""
        with self.results.timed("evaluation"):
            tf = self.processor.teacher_force_logprobs(rollout.batch)
        for check in self.checks:
            check.check_scores(rollout, tf)
        self.evaluation.append((rollout, tf))
        return StepOutput(rollout, tf.seq_logprobs, tf.token_entropies, self.results)

    def hold(self, rollout: Rollout) -> StepOutput:
        """An E rollout, or a U rollout of a held U batch: counted now (its entropies as generation computed
        them, else from teacher forcing without gradients), added to ΣX or ΣY at the probe's end (`finish`)."""
        batch = rollout.batch
        token_logprobs, token_entropies = batch.token_logprobs, batch.token_entropies
        if token_entropies is None:  # model.generate (the legacy path) or rollouts saved without them
            with self.results.timed("teacher_force_x"):
                tf = self.processor.teacher_force_logprobs(batch)
            token_logprobs, token_entropies = tf.token_logprobs, tf.token_entropies
        self.sums.count(rollout.role, rollout.rewards, token_entropies, batch.response_mask)
        if rollout.role == "U":
            self.update_batch.hold(rollout, token_entropies)
        else:
            self.held.append(rollout)
        return StepOutput(rollout, token_logprobs.sum(-1), token_entropies, self.results)

    def _held_update_pass(self) -> None:
        """A held U batch into ΣY, once its counts over every process are known (a collective: every process)."""
        if not self.update_batch.holds:
            return
        rollouts = self.update_batch.prepare(self.collectives.gather)

        def update_pass():
            for rollout in rollouts:
                self.accumulate(rollout)

        self._unless_failed(update_pass)
        self.collectives.raise_any(self.failure)

    def entropy_pass(self, directions: dict[str, list[torch.Tensor]]) -> None:
        """The held E rollouts into ΣX; with directions (Ȳ for the standard error, Δθ_real for the next
        checkpoint, the live step in a training run) one prompt per forward, each giving ⟨X(e), direction⟩
        (in entropy_derivatives) as its gradient is added."""
        for rollout in self.held:  # kept until the probe ends: a later stage's E pass goes over them again
            self.accumulate(rollout, directions)

    def accumulate(
        self, rollout: Rollout, directions: dict[str, list[torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing with gradients, one microbatch of whole prompts at a time, into ΣX or ΣY; a U
        rollout is also counted (held rollouts are counted when they are held).
        directions (E only): one prompt per microbatch, and each prompt's ⟨X(e), direction⟩ kept."""
        scored = []
        with self.results.timed(f"teacher_force_{'x' if rollout.role == 'E' else 'y'}"):
            batch = rollout.batch
            slices = self.processor.microbatches(batch.num_prompts, batch.num_responses_per_prompt)
            if directions:
                slices = [slice(b, b + 1) for b in range(batch.num_prompts)]
            for rows in phase_bar(f"teacher forcing {rollout.role}", "microbatch", iterable=slices):
                micro = rollout.select(rows)
                tf = self.processor.teacher_force_logprobs(micro.batch, with_grad=True)
                for check in self.checks:
                    check.check_scores(micro, tf)
                with torch.enable_grad():
                    if rollout.role == "E":
                        loss = self.entropy_loss(micro, tf)
                        along = self.sums.add_gradient(self.sums.sum_x, loss, list((directions or {}).values()))
                        if directions:
                            totals = dict(zip(directions, along.sum(1).tolist()))
                            self.entropy_derivatives.append((micro.prompt_ids[0], totals))
                        if "y_bar" in (directions or {}):
                            self.entropy_parameter_terms.append(along[list(directions).index("y_bar")])
                    elif self.sums.sum_b is None:
                        self.sums.add_gradient(self.sums.sum_y, self.update_loss(micro, tf).sum())
                    else:  # the same forward's bonus, per unit coefficient, into ΣB
                        self.sums.add_gradient(self.sums.sum_y, self.update_loss(micro, tf).sum(), retain_graph=True)
                        self.sums.add_gradient(self.sums.sum_b, self.bonus_loss(micro, tf).sum())
                scored.append((micro, tf.detached()))
        self.scored.extend(scored)
        token_entropies = torch.cat([tf.token_entropies for _, tf in scored])
        if rollout.role == "U" and not self.update_batch.holds:
            self.sums.count("U", rollout.rewards, token_entropies, rollout.batch.response_mask)
        return torch.cat([tf.seq_logprobs for _, tf in scored]), token_entropies

    def finish(self, probe_index: int) -> ProbeResult:
        """∇J̄ and Ȳ from ΣY; the held E batch into ΣX; X̄, δH₁ = scale · ⟨X̄, Ȳ⟩ (float64); the
        standard error, contributions, covariance proxy and η sweep as asked. With sequential sampling, more E
        and U prompts until the SE reaches its target (sequential.py), before the next checkpoint and η sweep."""
        # The SEs of the counterfactuals, the shares and the top contributions (extras, model.breakdown_se) only at the
        # final sizes: with sequential sampling the stages go without them and the last is estimated once more with them.
        extras = self.sequential is None and self.settings.breakdown_se
        result, step, directions = self._estimate(probe_index, extras)
        contributions = self._standard_error(result, step, extras)
        while self.sequential is not None and (more := self.sequential.more(result)) is not None:
            batches = self.more_prompts(probe_index, more["E"], more["U"])
            if not batches:
                self.sequential.stages[-1]["stop"] = "no unused prompts left"
                break
            for batch in batches:
                with self._charged(batch.role):
                    self._work(batch)
            result, step, directions = self._estimate(probe_index, extras)
            contributions = self._standard_error(result, step, extras)
        if self.sequential is not None:
            if self.settings.standard_error and self.settings.breakdown_se:
                result, step, directions = self._estimate(probe_index, extras=True)
                contributions = self._standard_error(result, step, extras=True)
            result.sequential = self.sequential.record()
        if self.next_checkpoint is not None:
            with self.results.timed("next_checkpoint"):
                result.next_checkpoint = self._against_next_checkpoint(result, directions["real_step"])
        if self.settings.eta_sweep:
            entropy_batch = [(r, tf) for r, tf in self.scored if r.role == "E"]
            with self.results.timed("eta_sweep"):
                result.eta_sweep, result.eta_sweep_summary = eta_sweep(
                    self.processor, self.named_params, self.geometry, self.vectors.x_bar, self.vectors.grad_j,
                    self.settings.eta_sweep, self.evaluation, entropy_batch, self.settings.entropy_target,
                    result.covariance, self.collectives.gather,
                )  # fmt: skip
        self.sums, self.scored, self.evaluation = ProbeSums(self.named_params, bonus=self.with_bonus_sum), [], []
        self.entropy_derivatives, self.entropy_parameter_terms, self.role_seconds, self.held = [], [], {}, []
        self.results.probes.append(result)
        self.contributions = contributions
        return result

    def _estimate(
        self, probe_index: int, extras: bool = True
    ) -> tuple[ProbeResult, CoefficientStep | None, dict]:
        """δH₁ from the sums so far: ∇J̄, Ȳ, the E pass (along the directions it returns), X̄. With sequential
        sampling it can run again after more prompts: the sums are read, not divided in place, and the E pass
        starts again over every E prompt (its weights and Ȳ have changed). extras: with the standard error, the
        counterfactual selections' steps too (their SEs' E side)."""
        with self._charged("U"):
            self._held_update_pass()
        sums = self.sums
        sums.all_reduce(self.collectives)
        e, u = sums.counts["E"], sums.counts["U"]
        B_E, B_U = e.prompts, u.prompts
        require(B_E > 0 and B_U > 0, f"probe {probe_index} ended with B_E={B_E}, B_U={B_U}: both must be >= 1")
        params = [p for _, p in self.named_params]
        with self.results.timed("finish_probe"):
            # In place, unless a later stage adds to the sums: model-sized copies cost time.
            grad_j = [s / B_U if self.sequential else s.div_(B_U) for s in sums.sum_y]
            batch_scale = self._batch_scale(u.tokens / B_U)
            if batch_scale != 1.0:
                grad_j = [g.mul_(batch_scale) for g in grad_j]
            grad_norm = estimators.norm(grad_j)
            clip = clip_factor(grad_norm, self.trainer.max_grad_norm)
            if clip != 1.0:
                grad_j = [g.mul_(clip) for g in grad_j]
            y_bar = self.geometry.step_direction(grad_j, params)
            step = self._coefficient_step(grad_j, grad_norm, clip, u.tokens / B_U)
        if self.settings.entropy_target == "token_mean":
            require(e.tokens > 0, f"probe {probe_index}: every E response is empty, so token_mean is undefined")
            self.x_weights = estimators.token_mean_weights(e.entropy_sum, e.tokens, e.responses)
        directions = {"y_bar": y_bar} if self.settings.standard_error else {}
        if self.settings.standard_error:
            with self.results.timed("finish_probe"):
                self.step_derivative = self.geometry.step_derivative(grad_j, params)
                # The step's derivative at ĝ₀ applied to g_b and (adamw_step) to ĝ₀ itself: the E side of c*'s SE
                # and of the whole-step ("all") selection's.
                if self.geometry.kind == "adamw_step" and (step is not None or extras):
                    directions["gradient_step"] = self.step_derivative(grad_j)
                if step is not None:
                    directions["bonus_step"] = self.step_derivative(step.bonus_grad)
            self.selections = {}
            if extras:
                with self.results.timed("selection_steps"), self._charged("U"):
                    self.selections = self._token_selections()
                    directions.update(self._selection_directions(grad_j, batch_scale * clip))
        if self.next_checkpoint is not None:  # Δθ_real = θ′ − θ
            directions["real_step"] = [
                (w.double() - p.detach().double()).float() for w, p in zip(self.next_checkpoint.weights, params)
            ]
        if self.sequential is not None:  # a stage's E pass over every E prompt so far
            self.entropy_derivatives, self.entropy_parameter_terms = [], []
            self.scored = [(micro, tf) for micro, tf in self.scored if micro.role != "E"]
            for s in sums.sum_x:
                s.zero_()
        with self._charged("E"):
            self._unless_failed(lambda: self.entropy_pass(directions))
        self.collectives.raise_any(self.failure)
        self.collectives.sum_(sums.sum_x)
        with self.results.timed("finish_probe"):
            x_bar = [s.div_(B_E) for s in sums.sum_x]
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
        self.vectors = ProbeVectors(
            self.weight_keys, x_bar, grad_j, y_bar, self.x_weights, batch_scale * clip, self.geometry.scale
        )
        shares = parameter_shares(self.weight_keys, x_bar, y_bar)
        result.parameter_shares = {key: scale * share for key, share in shares.items()}
        result.block_shares = block_shares(result.parameter_shares)
        return result, step, directions

    def _update_scored(self) -> list[tuple[Rollout, TeacherForcing]]:
        return [(micro, tf) for micro, tf in self.scored if micro.role == "U"]

    def _standard_error(
        self, result: ProbeResult, step: CoefficientStep | None, extras: bool = True
    ) -> ProbeContributions | None:
        """With the standard error: it, the contributions (_contributions), and whether δH₁ is resolved; extras: the
        SEs of the counterfactuals (with _estimate's extras), of the shares and (if asked) of the top contributions."""
        B_E, B_U = result.B_E, result.B_U
        contributions = None
        if self.settings.standard_error:
            direction = self.step_derivative(self.vectors.x_bar)  # v: b_u = ⟨v, ∇J(p_u)⟩
            if extras:
                with self.results.timed("share_se"), self._charged("U"):
                    self._share_standard_errors(result, direction)
            with self.results.timed("standard_error"), self._charged("U"):
                contributions = self._contributions(result, direction, step)
            if extras and self.settings.top_contributions_se:
                with self.results.timed("top_se"), self._charged("E"):
                    self._top_standard_errors(result)
            # Wall seconds per prompt: each process's time over all processes' prompts (they run side by side).
            sizes = {"E": B_E, "U": B_U}
            result.seconds_per_prompt = {role: self.role_seconds.get(role, 0.0) / B for role, B in sizes.items()}
            result.resolved = estimators.resolved(result.delta_h1, result.delta_h1_se)
            result.sizes_for_target = estimators.sizes_for_target(
                result.delta_h1, result.delta_h1_se_parts, sizes, result.seconds_per_prompt
            )
        return contributions

    def _contributions(
        self, result: ProbeResult, direction: list[torch.Tensor], step: CoefficientStep | None
    ) -> ProbeContributions:
        """The plug-in SE from a_e per E prompt (kept by the E pass) and b_u per U prompt, and every sample's
        share of δH₁: η a_e / B_E per E prompt, d_{u,g,t} = η c ⟨v, ∇log q(y_t)⟩ / B_U per U token, from one
        forward-mode pass over the U batch along v (direction); the counterfactual selections with their SEs; with
        step, the entropy_coef that holds the entropy steady."""
        vectors, scale = self.vectors, self.geometry.scale
        B_E, B_U = result.B_E, result.B_U
        update = self._update_scored()
        params = [p for _, p in self.named_params]
        # Each token's share: its log q's derivative times its coefficient, plus, with an entropy bonus, its H_t's
        # derivative times the bonus's coefficient (both from the one forward-mode pass).
        bonus = self.has_bonus_term
        entropies = bonus or step is not None  # H_t's derivatives: the bonus's share, and g_b's b_u^b
        derivatives = directional_derivatives(
            self.processor, self.named_params, [micro for micro, _ in update], direction,
            (lambda micro, tf: torch.stack([tf.token_logprobs, tf.token_entropies])) if entropies
            else (lambda micro, tf: tf.token_logprobs),
        )  # fmt: skip
        local = ProbeContributions(result.probe_index)
        b_u, bonus_b, update_ids = [], [], []
        for (micro, derivative), (_, tf) in zip(derivatives, update):
            coefficients, bonus_coefficients = self.update_batch.coefficients(micro, tf.token_logprobs)
            token_b = coefficients.double() * (derivative[0] if entropies else derivative)
            if bonus:
                token_b = token_b + bonus_coefficients.double() * derivative[1]
            token_b = token_b * vectors.update_scale
            b_u.append(token_b.sum((1, 2)))
            if step is not None:  # b_u^b = ⟨v, this prompt's piece of g_b⟩
                unit = self.update_batch.bonus_coefficients(micro).double()
                bonus_b.append((unit * derivative[1]).sum((1, 2)) * step.bonus_scale)
            update_ids.extend(micro.prompt_ids)
            per_token = scale * token_b / B_U
            local.add_rollout(
                micro, per_token.sum(-1), per_token, tf.token_logprobs, tf.token_entropies, self.processor.tokenizer
            )
        for micro, tf in self.scored:  # E responses: in the tables, their share is their prompt's
            if micro.role == "E":
                local.add_rollout(micro, None, None, tf.token_logprobs, tf.token_entropies, self.processor.tokenizer)
        bonus_b = torch.cat(bonus_b).cpu() if bonus_b else None
        shares = self.collectives.gather((self.entropy_derivatives, torch.cat(b_u).cpu(), update_ids, local, bonus_b))
        along = [along for share in shares for _, along in share[0]]  # per E prompt, a_e along each direction
        entropy = [(prompt_id, a["y_bar"]) for share in shares for prompt_id, a in share[0]]
        a_e = torch.tensor([a for _, a in entropy], dtype=torch.float64)
        b_u, update_ids = torch.cat([s[1] for s in shares]), [i for s in shares for i in s[2]]
        contributions = ProbeContributions.merge([s[3] for s in shares])
        result.delta_h1_se = estimators.plugin_standard_error(a_e, b_u, scale)
        result.delta_h1_se_parts = estimators.standard_error_parts(a_e, b_u, scale)
        result.update_prompt_contributions = dict(zip(update_ids, (scale * b_u / B_U).tolist()))
        result.entropy_prompt_contributions = {prompt_id: scale * a / B_E for prompt_id, a in entropy}
        result.contributions_add_up_to = "the linearised step" if self.geometry.kind == "adamw_step" else "delta_h1"
        result.top_responses = contributions.top_responses()
        result.top_tokens = contributions.top_tokens()
        step_of_all = "gradient_step" if self.geometry.kind == "adamw_step" else "y_bar"  # the linearised Ȳ
        result.counterfactuals = contributions.counterfactuals(self.selections, update_ids, scale, {
            name: torch.tensor([a[step_of_all if name == "all" else f"selection/{name}"] for a in along], dtype=torch.float64)
            for name in self.selections
        })  # fmt: skip
        if step is not None:
            entropy_terms = {name: torch.tensor([a[name] for a in along], dtype=torch.float64) for name in along[0]}
            result.counterfactuals[ENTROPY_COEF_FOR_ZERO] = entropy_coef_for_zero(
                self.geometry, step, vectors.x_bar, params, result.delta_h1, entropy_terms, b_u,
                torch.cat([s[4] for s in shares]), self.trainer.use_adaptive_entropy,
            )  # fmt: skip
        return contributions

    def _coefficient_step(
        self, grad_j: list[torch.Tensor], grad_norm: float, clip: float, tokens_per_prompt: float
    ) -> CoefficientStep | None:
        """∇J̄ as a function of the entropy coefficient, from ΣY and ΣB (None without ΣB): g_b = ΣB / B_U times the
        bonus's normaliser where it is not in the coefficients (a U batch not held: 1 / its tokens per prompt)."""
        if self.sums.sum_b is None:
            return None
        bonus_scale = 1.0 if self.update_batch.holds else 1.0 / tokens_per_prompt
        B_U = self.sums.counts["U"].prompts
        bonus_grad = [(s / B_U if self.sequential else s.div_(B_U)).mul_(bonus_scale) for s in self.sums.sum_b]
        return CoefficientStep(
            grad_j, bonus_grad, grad_norm, clip, self.trainer.entropy_bonus, self.trainer.max_grad_norm, bonus_scale
        )

    def _against_next_checkpoint(self, result: ProbeResult, real_step: list[torch.Tensor]) -> dict:
        """The step the trainer really took, Δθ_real = θ′ − θ, beside the predicted one: the first-order change
        along it, ⟨X̄, Δθ_real⟩ (SE over E prompts), the true change H(θ′) − H(θ) on the V batch, the
        covariance proxy, and how well the two steps align."""
        nxt, vectors = self.next_checkpoint, self.vectors
        require(self.evaluation, "model.next_checkpoint needs an evaluation (V) batch: set data.evaluate true")
        shares = self.collectives.gather([along["real_step"] for _, along in self.entropy_derivatives])
        a_real = torch.tensor([a for share in shares for a in share], dtype=torch.float64)
        rollouts, at_theta = [r for r, _ in self.evaluation], [tf for _, tf in self.evaluation]
        at_next = {name: w for (name, _), w in zip(self.named_params, nxt.weights)}
        v = true_change(
            rollouts, at_theta, score(self.processor, rollouts, at_next), self.settings.entropy_target,
            self.processor.config.max_new_tokens, self.collectives.gather,
        )  # fmt: skip
        comparison = {
            "path": nxt.path,
            "global_step": nxt.global_step,
            "steps": nxt.steps,
            "delta_h1": result.delta_h1,
            "delta_h_along_real": estimators.dot(vectors.x_bar, real_step),
            "delta_h_along_real_se": (a_real.std() / len(a_real) ** 0.5).item() if len(a_real) > 1 else None,
            "delta_h_true": v.delta,
            "delta_h_true_se": v.se,
            "ess": v.ess,
            "covariance_proxy": -self.geometry.learning_rate * result.covariance,
            **step_agreement(self.weight_keys, vectors.update, real_step),
        }
        if nxt.steps > 1:
            comparison["note"] = (
                f"δH₁ predicts one optimizer step; the checkpoints are {nxt.steps} steps apart, so Δθ_real, "
                "⟨X̄, Δθ_real⟩ and the true change span all of them"
            )
        return comparison

    def _covariance(self) -> float:
        """Cov(log π(y_t), A(y_t)) over the U batch's response tokens (the covariance proxy's)."""
        update = self._update_scored()
        masks = [tf.response_mask.bool() for _, tf in update]
        log_q = torch.cat([tf.token_logprobs[m] for (_, tf), m in zip(update, masks)]).double().cpu()
        advantage = torch.cat([micro.advantages[..., None].expand_as(m)[m] for (micro, _), m in zip(update, masks)])
        shares = self.collectives.gather((log_q, advantage.double().cpu()))
        return covariance_proxy(torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares]))

    def _batch_scale(self, tokens_per_prompt: float) -> float:
        """The trainer's normalisers that need the whole U batch: the token count of dapo, cispo, vespo and
        bnpo (the U batch as one generation batch: B_U / N_tok) and scale_rewards batch's 1 / (std of all
        rewards + 1e-4). 1 for a held U batch, whose coefficients hold them."""
        if self.update_batch.holds:
            return 1.0
        factor = 1.0 / tokens_per_prompt if self.update_batch.trainer.loss_type in TOKEN_COUNT_LOSSES else 1.0
        if self.trainer.scale_rewards == "batch" and self.settings.G > 1:  # with G = 1 every A is 0
            std = nanstd(torch.cat(self.sums.update_rewards)).item()
            factor = 0.0 if math.isnan(std) else factor / (std + STD_EPS)  # < 2 scored rewards: TRL's A are all 0
        return factor
