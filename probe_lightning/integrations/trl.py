"""EntropyProbeCallback: the entropy probe inside a TRL GRPOTrainer run (`pip install probe_lightning[trl]`).

    GRPOTrainer(..., callbacks=[EntropyProbeCallback(every_n_steps=10, B_E=16, G_E=4, B_V=16)])

On a probed step (global_step N, about to take step N + 1), at on_pre_optimizer_step, where p.grad is the
trainer's final (clipped) gradient:
- Δθ = adamw_step(the live Adam state, θ, ∇J = −p.grad): the exact step optimizer.step() takes (no U sampling);
- X̄, the token-mean entropy gradient (rb estimator), on an E batch of B_E prompts of the trainer's own
  train_dataset, G_E responses each, sampled from the current policy with the trainer's temperature, top_p and
  max_completion_length by the probe's seeded sampler (each response its own generator: torch's RNG untouched);
- δH₁ = ⟨X̄, Δθ⟩ and its SE from a_e = ⟨X(e), Δθ⟩ per E prompt: the E side only, Δθ being exact;
- a V batch of B_V prompts sampled and scored at θ.
At on_optimizer_step (θ′ now in the model): the true change H(θ′) − H(θ) importance-sampled on V, its SE, ESS.
The covariance proxy −η Cov(log π, A) is over the tokens of the trainer's own generation batch (log π by a
no-grad teacher forcing at θ of its completion_ids, with its advantages).

The E and V prompts are drawn by `prompt_batch(role, step)` (numpy, seeded by (seed, step)) and each response
by sample_seed(seed, probe_index = step, role, prompt row, g): the offline probe on checkpoint-N replays the same
E batch from that PromptBatch. Training is untouched: p.grad, the optimizer state and the weights are only read,
the model's train/eval mode and torch/numpy/python RNG states are restored. Anything the probe cannot handle
(another trainer, optimizer or a sharded strategy, or an error while probing) is one warning, and training goes
on without the probe.
"""

import math
import random
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from transformers import TrainerCallback

from probe_lightning import estimators
from probe_lightning.build import build_probe
from probe_lightning.data import PromptBatch
from probe_lightning.integrations.live_optimizer import adam_states, unsupported_optimizer
from probe_lightning.preconditioning import adamw_step
from probe_lightning.problems import prompt_text
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor
from probe_lightning.settings import ProbeSettings
from probe_lightning.true_change import covariance_proxy, true_change

KEYS = ("delta_h1", "delta_h1_se", "delta_h_true", "delta_h_true_se", "covariance_proxy")


class EntropyProbeCallback(TrainerCallback):
    def __init__(
        self,
        every_n_steps: int = 10,
        B_E: int = 16,
        G_E: int = 4,
        B_V: int = 16,
        seed: int = 0,
        output_dir: str | None = None,
        tf_batch_size: int = 16,
        gen_batch_size: int = 32,
    ):
        """output_dir: where probes.parquet and the plot go (None: the trainer's output_dir/entropy_probe)."""
        if every_n_steps < 1 or B_E < 1 or G_E < 2 or B_V < 0:
            raise ValueError(f"every_n_steps={every_n_steps}, B_E={B_E}, G_E={G_E}, B_V={B_V}: need >= 1, 1, 2, 0")
        self.every_n_steps, self.B_E, self.G_E, self.B_V = every_n_steps, B_E, G_E, B_V
        self.seed, self.output_dir = seed, output_dir
        self.tf_batch_size, self.gen_batch_size = tf_batch_size, gen_batch_size
        self.trainer = None
        self.disabled: str | None = None  # why the probe is off, once it is
        self.rows: list[dict] = []  # one per probed step
        self._pending: dict | None = None  # the probed step's numbers until θ′ is known
        self._trainer_batch: dict[str, torch.Tensor] | None = None  # the latest generation batch

    # ---- the trainer's events ----

    def on_init_end(self, args, state, control, **kwargs):
        self.trainer = self.trainer or _calling_trainer(self)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.trainer = self.trainer or _calling_trainer(self)
        reason = self._refusal(args, optimizer)
        if reason:
            self._disable(reason)
            return
        generate_and_score = self.trainer._generate_and_score_completions

        def keeping_the_batch(inputs):
            output = generate_and_score(inputs)
            keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
            self._trainer_batch = {k: output[k].detach() for k in keep if isinstance(output.get(k), torch.Tensor)}
            return output

        self.trainer._generate_and_score_completions = keeping_the_batch

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.disabled or state.global_step % self.every_n_steps:
            return
        self._guarded(lambda: self._before_step(state.global_step, optimizer))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._pending is not None and not self.disabled:
            self._guarded(self._after_step)
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.rows:
            self._guarded(self._plot)

    # ---- the probe ----

    def prompt_batch(self, role: str, step: int) -> PromptBatch:
        """The E (B_E) or V (B_V) prompts of the probe at `step`: rows of the trainer's train_dataset drawn by a
        numpy generator seeded by (seed, step, role), without replacement where the data set is large enough.
        Their responses are seeded by (seed, step, role, row, g) (rollout.sample_seed)."""
        dataset = self.trainer.train_dataset
        size = self.B_E if role == "E" else self.B_V
        rng = np.random.default_rng([self.seed, step, "EVU".index(role)])
        rows = rng.choice(len(dataset), size=size, replace=size > len(dataset)).tolist()
        prompts = [dataset[r]["prompt"] for r in rows]
        return PromptBatch(
            probe_index=step, role=role, questions=[prompt_text(p) for p in prompts], answers=[None] * size,
            prompt_ids=rows, last_in_probe=False, seed=self.seed, prompts=prompts, columns=[{} for _ in rows],
        )  # fmt: skip

    def generation_config(self) -> GenerationConfig:
        """The trainer's sampling: temperature, top_p, max_completion_length, its EOS ids."""
        args, tokenizer = self.trainer.args, self.trainer.processing_class
        eos = list(getattr(self.trainer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        return GenerationConfig(
            max_new_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos,
            tf_batch_size=self.tf_batch_size, gen_batch_size=self.gen_batch_size,
        )  # fmt: skip

    def _before_step(self, step: int, optimizer) -> None:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        tokenizer = self.trainer.processing_class
        processor = SequenceProcessor(model, tokenizer, self.generation_config())
        settings = ProbeSettings(
            model=getattr(model.config, "_name_or_path", None) or "model", G=self.trainer.num_generations,
            G_E=self.G_E, generation=processor.config, standard_error=False,  # a_e comes from the E pass below
        )  # fmt: skip
        probe = build_probe(processor, settings, rewards=RewardFunctions([unscored], ["none: E and V need no reward"]))
        named_params = probe.named_params
        params = [p for _, p in named_params]
        grad_j = [-p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # ∇J = −p.grad
        states = adam_states(optimizer, named_params)
        delta_theta = adamw_step(states, params, grad_j)
        # X̄ on the E batch: Probe's own E path (hold, then the entropy pass with Δθ as the direction).
        entropy_prompts = self.prompt_batch("E", step)
        probe.hold(probe.make_rollout(entropy_prompts))
        counts = probe.sums.counts["E"]
        probe.x_weights = estimators.token_mean_weights(counts.entropy_sum, counts.tokens, counts.responses)
        probe.entropy_pass({"delta_theta": delta_theta})
        x_bar = [s / counts.prompts for s in probe.sums.sum_x]
        a_e = torch.tensor([along["delta_theta"] for _, along in probe.entropy_derivatives], dtype=torch.float64)
        row = {
            "step": step,
            "delta_h1": estimators.dot(x_bar, delta_theta),
            "delta_h1_se": math.sqrt(a_e.var().item() / len(a_e)) if len(a_e) > 1 else float("nan"),
            "x_norm": estimators.norm(x_bar),
            "step_norm": estimators.norm(delta_theta),
            "entropy_mean": counts.entropy_sum / counts.tokens,
            "learning_rate": states[0].lr,
            "B_E": counts.prompts,
            "G_E": self.G_E,
            "e_prompt_rows": entropy_prompts.prompt_ids,
            "seed": self.seed,
            "covariance_proxy": -states[0].lr * self._trainer_covariance(processor),
        }
        v_rollouts, at_theta = [], []
        if self.B_V:
            v_rollouts = [probe.make_rollout(self.prompt_batch("V", step))]
            at_theta = [processor.teacher_force_logprobs(r.batch) for r in v_rollouts]
        self._pending = {"row": row, "processor": processor, "v": (v_rollouts, at_theta)}

    def _after_step(self) -> None:
        pending = self._pending
        row, processor, (v_rollouts, at_theta) = pending["row"], pending["processor"], pending["v"]
        if v_rollouts:  # θ′ is the model's own parameters now
            at_step = [processor.teacher_force_logprobs(r.batch) for r in v_rollouts]
            change = true_change(v_rollouts, at_theta, at_step, "token_mean", processor.config.max_new_tokens)
            row |= {"delta_h_true": change.delta, "delta_h_true_se": change.se, "ess": change.ess}
        else:
            row |= {"delta_h_true": float("nan"), "delta_h_true_se": float("nan"), "ess": float("nan")}
        self.rows.append(row)
        self._log(row)
        folder = self._folder()
        pd.DataFrame(self.rows).to_parquet(folder / "probes.parquet", index=False)

    def _trainer_covariance(self, processor: SequenceProcessor) -> float:
        """Cov(log π(y_t), A(y_t)) over the completion tokens of the trainer's generation batch (log π at
        θ and the trainer's temperature, teacher-forced without gradients); nan without one."""
        batch = self._trainer_batch
        if not batch or "advantages" not in batch:
            return float("nan")
        model = processor.model
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        width = batch["completion_ids"].shape[1]
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1 : -1]
            logprobs = (logits.float() / processor.config.temperature).log_softmax(-1)
            logprobs = logprobs.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
        mask = batch["completion_mask"].bool()
        advantages = batch["advantages"].double()[:, None].expand_as(logprobs)
        return covariance_proxy(logprobs.double()[mask], advantages[mask])

    # ---- plumbing ----

    def _guarded(self, work) -> None:
        """work() with the trainer's RNG states, train/eval mode and gradients restored after it; an error
        turns the probe off with one warning instead of stopping the training run."""
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        training = model.training
        rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        grads = [p.grad for p in model.parameters()]
        try:
            model.eval()
            work()
        except Exception as error:  # never the user's run
            self._pending = None
            self._disable(f"{type(error).__name__}: {error}")
        finally:
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            model.train(training)
            torch.set_rng_state(rng[0])
            np.random.set_state(rng[1])
            random.setstate(rng[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    def _refusal(self, args, optimizer) -> str | None:
        trainer = self.trainer
        if trainer is None or not hasattr(trainer, "_generate_and_score_completions"):
            name = type(trainer).__name__ if trainer is not None else "unknown"
            return f"trainer {name} is not a policy-gradient (GRPO-style) trainer"
        accelerator = trainer.accelerator
        if getattr(accelerator, "is_fsdp2", False) or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            return "a sharded strategy (FSDP/DeepSpeed) holds only a shard of each parameter on a process"
        if accelerator.num_processes > 1:
            return f"{accelerator.num_processes} processes: the callback probes single-process runs only"
        # The probe samples q = softmax(z / temperature), then top-p: a sampling setting beyond those changes q.
        sampling = {"top_k": (getattr(args, "top_k", 0), (0, None)), "min_p": (getattr(args, "min_p", None), (0, None)),
                    "repetition_penalty": (getattr(args, "repetition_penalty", 1.0), (1.0,)),
                    "generation_kwargs": (getattr(args, "generation_kwargs", None), (None, {}))}  # fmt: skip
        unmodelled = [f"{name}={value!r}" for name, (value, neutral) in sampling.items() if value not in neutral]
        if unmodelled:
            return f"trainer sampling {', '.join(unmodelled)}: the probe samples with temperature and top_p only"
        return unsupported_optimizer(optimizer)

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        warnings.warn(f"EntropyProbeCallback: {reason}; training continues without the probe", stacklevel=2)

    def _log(self, row: dict) -> None:
        """Into TRL's metrics of this step, so they land in its next log beside TRL's `entropy`."""
        metrics = getattr(self.trainer, "_metrics", None)
        for key in KEYS:
            if metrics is not None:
                metrics["train"][f"entropy_probe/{key}"].append(row[key])
        if metrics is None:
            self.trainer.log({f"entropy_probe/{key}": row[key] for key in KEYS})

    def _folder(self) -> Path:
        folder = Path(self.output_dir or Path(self.trainer.args.output_dir) / "entropy_probe")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _plot(self) -> None:
        """Predicted δH₁ and the realized change, each ± SE, over the probed steps (matplotlib's Figure, without
        pyplot: the user's backend is left alone)."""
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
        figure.savefig(self._folder() / "predicted_vs_realized.png", dpi=120)


def unscored(completions: list, **kwargs) -> list[float]:
    """No reward: the E and V batches need only their responses (their rewards, 0, are unused)."""
    return [0.0] * len(completions)


def _calling_trainer(callback: EntropyProbeCallback):
    """The transformers Trainer whose callback handler holds `callback`: a TrainerCallback is not handed its
    trainer, but it is called from the trainer's own methods, so the trainer is `self` in a frame above."""
    import inspect

    from transformers import Trainer

    for frame in inspect.stack(context=0)[1:]:
        candidate = frame.frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in getattr(candidate.callback_handler, "callbacks", []):
            return candidate
    return None
