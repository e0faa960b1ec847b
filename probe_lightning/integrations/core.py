"""InTrainingProbe: the entropy probe on a training run's own optimizer steps, with no training framework in it.

A framework's callback (trl.py, lightning.py) calls it on each step it probes (`due(step)`):
- `before_step`, just before optimizer.step(), given the gradient the optimizer will receive: Δθ = adamw_step(the
  live Adam state, θ, ∇J = −that gradient), the exact step (no U sampling); X̄, the token-mean entropy gradient
  (rb estimator), on an E batch of B_E prompts, G_E responses each, sampled from the current policy by the probe's
  seeded sampler; δH₁ = ⟨X̄, Δθ⟩ and its SE from a_e = ⟨X(e), Δθ⟩ per E prompt (the E side only: Δθ is exact);
  a V batch of B_V prompts sampled and scored at θ;
- `after_step`, θ′ now in the model: the true change H(θ′) − H(θ) importance-sampled on V, its SE and ESS, the
  covariance proxy −η Cov(log π, A) over the trainer's own tokens when the callback has them, and the step's row
  (`rows`; `write_table`, `write_plot`).

The E and V prompts are drawn by `prompt_batch(pool, role, step)` (numpy, seeded by (seed, step, role)) and each
response by rollout.sample_seed(seed, probe_index = step, role, prompt row, g): the offline probe on checkpoint-N
replays the same E batch from that PromptBatch. Training is untouched: p.grad, the optimizer state and the weights
are only read; the model's train/eval mode, its parameters' .grad and torch/numpy/python RNG states are restored.
An error while probing is one warning and turns the probe off; training goes on.

Several processes (DDP, docs/math.md §10): each holds the whole model and the all-reduced gradient, so Δθ is the
same on every one. Each takes every world_size-th prompt of the E and V draws; the E counts and ΣX are summed, a_e
and the true change's and the covariance's terms gathered (distributed.Collectives), so every process gets the
numbers one process would. The processes meet after each piece of local work, so an error on one turns the probe
off on all of them. Only rank 0 writes the table and the plot.
"""

import math
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from matplotlib.figure import Figure

from probe_lightning import estimators
from probe_lightning.build import build_probe
from probe_lightning.data import PromptBatch
from probe_lightning.distributed import Collectives
from probe_lightning.integrations.live_optimizer import adam_states
from probe_lightning.preconditioning import adamw_step
from probe_lightning.probe import Probe
from probe_lightning.problems import prompt_text
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.rollout import Rollout
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor, TeacherForcing
from probe_lightning.settings import ProbeSettings
from probe_lightning.true_change import covariance_proxy, true_change

KEYS = ("delta_h1", "delta_h1_se", "delta_h_true", "delta_h_true_se", "covariance_proxy")  # logged per probed step

# (log π(y_t) at θ, A(y_t)): flat tensors over the response tokens of the trainer's own batch, for the covariance proxy
TrainerTokens = tuple[torch.Tensor, torch.Tensor]
PromptDraw = Callable[[str, int], PromptBatch]  # (role, step) -> the whole E or V draw of that step


@dataclass
class _Pending:
    """A probed step between before_step and after_step."""

    row: dict
    processor: SequenceProcessor
    collectives: Collectives
    evaluation: list[tuple[Rollout, TeacherForcing]]  # this process's V rollouts, scored at θ
    trainer_tokens: TrainerTokens | None
    seconds: float  # before_step's wall time


class InTrainingProbe:
    def __init__(
        self, every_n_steps: int = 10, B_E: int = 16, G_E: int = 4, B_V: int = 16, seed: int = 0,
        name: str = "InTrainingProbe",
    ):  # fmt: skip
        """name: who speaks in the warnings (the callback's class)."""
        if every_n_steps < 1 or B_E < 1 or G_E < 2 or B_V < 0:
            raise ValueError(f"every_n_steps={every_n_steps}, B_E={B_E}, G_E={G_E}, B_V={B_V}: need >= 1, 1, 2, 0")
        self.every_n_steps, self.B_E, self.G_E, self.B_V = every_n_steps, B_E, G_E, B_V
        self.seed, self.name = seed, name
        self.disabled: str | None = None  # why the probe is off, once it is
        self.rows: list[dict] = []  # one per probed step
        self._pending: _Pending | None = None

    def due(self, step: int) -> bool:
        """Whether the step about to be taken after `step` optimizer steps is probed."""
        return self.disabled is None and step % self.every_n_steps == 0

    def prompt_batch(self, pool: Sequence, role: str, step: int) -> PromptBatch:
        """The E (B_E) or V (B_V) prompts of the probe at `step`: rows of `pool` (prompts, or rows with a "prompt"
        column) drawn by a numpy generator seeded by (seed, step, role), without replacement where the pool is
        large enough. Their responses are seeded by (seed, step, role, row, g) (rollout.sample_seed)."""
        size = self.B_E if role == "E" else self.B_V
        rng = np.random.default_rng([self.seed, step, "EVU".index(role)])
        rows = rng.choice(len(pool), size=size, replace=size > len(pool)).tolist()
        prompts = [pool[r]["prompt"] if isinstance(pool[r], Mapping) else pool[r] for r in rows]
        return PromptBatch(
            probe_index=step, role=role, questions=[prompt_text(p) for p in prompts], answers=[None] * size,
            prompt_ids=rows, last_in_probe=False, seed=self.seed, prompts=prompts, columns=[{} for _ in rows],
        )  # fmt: skip

    # ---- the step ----

    def before_step(
        self,
        model: torch.nn.Module,
        tokenizer,
        generation: GenerationConfig,
        optimizer,
        step: int,
        prompt_batch: PromptDraw,
        gradients: Callable[[list[torch.Tensor]], list[torch.Tensor | None]] = lambda params: [p.grad for p in params],
        trainer_tokens: Callable[[], TrainerTokens | None] | None = None,
    ) -> None:
        """The probe of the step optimizer.step() is about to take after `step` steps. model: the policy (a causal
        LM, unwrapped); prompt_batch(role, step): the E or V draw; gradients(params): what the optimizer receives
        for each parameter (p.grad, unless the trainer clips it later); trainer_tokens(): the trainer batch's
        tokens at θ."""
        start = time.perf_counter()
        self._pending = None
        pending = self._guarded(
            model, lambda: self._before(model, tokenizer, generation, optimizer, step, prompt_batch, gradients,
                                        trainer_tokens)
        )  # fmt: skip
        if pending is not None:
            pending.seconds = time.perf_counter() - start
            self._pending = pending

    def after_step(self, trainer_tokens: Callable[[], TrainerTokens | None] | None = None) -> dict | None:
        """θ′ is in the model: the probed step's row, finished (None when no step is pending or the probe failed).
        trainer_tokens(): the trainer batch's tokens at θ, where the callback has them only now."""
        pending, self._pending = self._pending, None
        if pending is None or self.disabled:
            return None
        start = time.perf_counter()
        row = self._guarded(pending.processor.model, lambda: self._after(pending, trainer_tokens))
        if row is None:
            return None
        row["probe_seconds"] = pending.seconds + time.perf_counter() - start
        self.rows.append(row)
        return row

    def _before(self, model, tokenizer, generation, optimizer, step, prompt_batch, gradients, trainer_tokens):
        rank, world_size = _rank_and_world_size()
        collectives = Collectives(world_size)
        mine = slice(rank, None, world_size)  # this process's prompts of each draw

        def prepare():  # Δθ; this process's E prompts sampled and counted
            for name, size in (("B_E", self.B_E), ("B_V", self.B_V)):
                if 0 < size < world_size:
                    raise ValueError(f"{name}={size} < {world_size} processes: each process needs a prompt of it")
            processor = SequenceProcessor(model, tokenizer, generation)
            probe = self._build_probe(processor)
            params = [p for _, p in probe.named_params]
            states = adam_states(optimizer, probe.named_params)
            grads = gradients(params)
            grad_j = [-g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]  # ∇J = −gradient
            entropy_prompts = prompt_batch("E", step)
            probe.hold(probe.make_rollout(entropy_prompts.select(mine)))
            return processor, probe, states, adamw_step(states, params, grad_j), entropy_prompts

        processor, probe, states, delta_theta, entropy_prompts = _meet(collectives, prepare)
        e = probe.sums.counts["E"]  # this process's
        totals = torch.tensor([e.prompts, e.responses, e.tokens, e.entropy_sum], dtype=torch.float64)
        collectives.sum_([totals])  # token_mean's weights need the whole E batch's counts
        B_E, responses, tokens, entropy_sum = totals.tolist()
        if tokens == 0:
            raise ValueError(f"every E response of step {step} is empty, so token_mean is undefined")
        probe.x_weights = estimators.token_mean_weights(entropy_sum, tokens, responses)
        _meet(collectives, lambda: probe.entropy_pass({"delta_theta": delta_theta}))
        collectives.sum_(probe.sums.sum_x)
        x_bar = [s / B_E for s in probe.sums.sum_x]
        shares = collectives.gather([along["delta_theta"] for _, along in probe.entropy_derivatives])
        a_e = torch.tensor([a for share in shares for a in share], dtype=torch.float64)
        row = {
            "step": step,
            "delta_h1": estimators.dot(x_bar, delta_theta),
            "delta_h1_se": math.sqrt(a_e.var().item() / len(a_e)) if len(a_e) > 1 else float("nan"),
            "x_norm": estimators.norm(x_bar),
            "step_norm": estimators.norm(delta_theta),
            "entropy_mean": entropy_sum / tokens,
            "learning_rate": states[0].lr,
            "B_E": round(B_E),
            "G_E": self.G_E,
            "e_prompt_rows": entropy_prompts.prompt_ids,
            "seed": self.seed,
            "world_size": world_size,
        }

        def evaluation() -> list[tuple[Rollout, TeacherForcing]]:  # this process's V prompts, scored at θ
            if not self.B_V:
                return []
            rollout = probe.make_rollout(prompt_batch("V", step).select(mine))
            return [(rollout, processor.teacher_force_logprobs(rollout.batch))]

        evaluated = _meet(collectives, evaluation)
        tokens_at_theta = _meet(collectives, trainer_tokens) if trainer_tokens else None
        return _Pending(row, processor, collectives, evaluated, tokens_at_theta, seconds=0.0)

    def _after(self, pending: _Pending, trainer_tokens) -> dict:
        processor, collectives, row = pending.processor, pending.collectives, pending.row
        rollouts = [rollout for rollout, _ in pending.evaluation]
        at_step = _meet(collectives, lambda: [processor.teacher_force_logprobs(r.batch) for r in rollouts])
        if self.B_V:  # θ′ is the model's own parameters now
            at_theta = [tf for _, tf in pending.evaluation]
            budget = processor.config.max_new_tokens
            change = true_change(rollouts, at_theta, at_step, "token_mean", budget, collectives.gather)
            row |= {"delta_h_true": change.delta, "delta_h_true_se": change.se, "ess": change.ess}
        else:
            row |= {"delta_h_true": float("nan"), "delta_h_true_se": float("nan"), "ess": float("nan")}
        tokens = _meet(collectives, trainer_tokens) if trainer_tokens else pending.trainer_tokens
        shares = collectives.gather(None if tokens is None else tuple(t.detach().double().cpu() for t in tokens))
        covariance = float("nan")
        if all(share is not None for share in shares):
            covariance = covariance_proxy(torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares]))
        row["covariance_proxy"] = -row["learning_rate"] * covariance
        return row

    def _build_probe(self, processor: SequenceProcessor) -> Probe:
        """A Probe over the policy for its E and V batches (no U batch, no reward: Δθ is the trainer's own)."""
        name = getattr(getattr(processor.model, "config", None), "_name_or_path", None) or "model"
        settings = ProbeSettings(
            model=name, G=self.G_E, G_E=self.G_E, generation=processor.config,
            standard_error=False,  # a_e comes from the E pass along Δθ
        )  # fmt: skip
        return build_probe(processor, settings, rewards=RewardFunctions([unscored], ["none: E and V need no reward"]))

    # ---- output ----

    def write_table(self, folder: Path) -> None:
        """probes.parquet, one row per probed step (rank 0 only)."""
        if self.rows and _rank_and_world_size()[0] == 0:
            folder.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(self.rows).to_parquet(folder / "probes.parquet", index=False)

    def write_plot(self, folder: Path) -> None:
        """predicted_vs_realized.png: predicted δH₁ and the realized change, each ± SE, over the probed steps
        (matplotlib's Figure, without pyplot: the user's backend is left alone; rank 0 only)."""
        if not self.rows or _rank_and_world_size()[0] != 0:
            return
        frame = pd.DataFrame(self.rows)
        figure = Figure(figsize=(7, 4))
        axes = figure.subplots()
        axes.errorbar(frame.step, frame.delta_h1, yerr=frame.delta_h1_se, marker="o", label="predicted δH₁ ± SE")
        realized = "realized H(θ′) − H(θ) ± SE"
        axes.errorbar(frame.step, frame.delta_h_true, yerr=frame.delta_h_true_se, marker="s", label=realized)
        axes.axhline(0, color="grey", lw=0.5)
        axes.set_xlabel("optimizer step N (the probe of step N + 1)")
        axes.set_ylabel("change of token-mean entropy")
        axes.legend()
        figure.tight_layout()
        folder.mkdir(parents=True, exist_ok=True)
        figure.savefig(folder / "predicted_vs_realized.png", dpi=120)

    # ---- plumbing ----

    def disable(self, reason: str) -> None:
        """The probe is off from now on, said in one warning; training goes on."""
        self.disabled = reason
        warnings.warn(f"{self.name}: {reason}; training continues without the probe", stacklevel=3)

    def _guarded(self, model: torch.nn.Module, work):
        """work() in eval mode, with the model's train/eval mode, its parameters' .grad and the RNG states restored
        after it; an error turns the probe off with one warning (None) instead of stopping the training run."""
        training = model.training
        rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        grads = [p.grad for p in model.parameters()]
        try:
            model.eval()
            return work()
        except Exception as error:  # never the user's run
            self._pending = None
            self.disable(f"{type(error).__name__}: {error}")
            return None
        finally:
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            model.train(training)
            torch.set_rng_state(rng[0])
            np.random.set_state(rng[1])
            random.setstate(rng[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)


class ProbeAdapter:
    """What a framework's callback shows of its InTrainingProbe (`self.probe`)."""

    probe: InTrainingProbe

    @property
    def rows(self) -> list[dict]:
        """One per probed step."""
        return self.probe.rows

    @property
    def disabled(self) -> str | None:
        """Why the probe is off, once it is."""
        return self.probe.disabled


def unscored(completions: list, **kwargs) -> list[float]:
    """No reward: the E and V batches need only their responses (their rewards, 0, are unused)."""
    return [0.0] * len(completions)


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _meet(collectives: Collectives, work):
    """work() on this process, then every process meets: if one failed, each raises (its own error, the others
    the failing rank's), so none waits in a collective that a failed one never reaches."""
    try:
        value = work()
    except Exception as error:
        collectives.raise_any(error)
        raise
    collectives.raise_any(None)
    return value
