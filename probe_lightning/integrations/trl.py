"""EntropyProbeCallback: the entropy probe inside a TRL GRPOTrainer run (`pip install probe_lightning[trl]`).

    GRPOTrainer(..., callbacks=[EntropyProbeCallback(every_n_steps=10, B_E=16, G_E=4, B_V=16)])

A thin adapter of core.InTrainingProbe (what is computed, and how training stays untouched) to TRL's events. On
a probed step (global_step N, about to take step N + 1), at on_pre_optimizer_step, p.grad is the trainer's final
(clipped) gradient: the probe's Δθ is its exact AdamW step, X̄ is taken on B_E prompts of the trainer's own
train_dataset sampled with the trainer's temperature, top_p and max_completion_length, and a V batch is sampled.
At on_optimizer_step (θ′ now in the model) the true change is measured. The covariance proxy is over the tokens
of the trainer's own generation batch (log π by a no-grad teacher forcing at θ of its completion_ids, with its
advantages). The numbers go into TRL's metrics beside its `entropy`; the rows and the plot into
OUTPUT_DIR/entropy_probe (output_dir). With several processes (DDP) every process probes its share of the prompts
and logs the one-process numbers. Anything the probe cannot handle (another trainer, optimizer or a sharded
strategy, or an error while probing) is one warning, and training goes on without the probe.
"""

from pathlib import Path

import torch
from transformers import TrainerCallback

from probe_lightning.data import PromptBatch
from probe_lightning.integrations.core import KEYS, InTrainingProbe, ProbeAdapter, TrainerTokens
from probe_lightning.integrations.live_optimizer import unsupported_optimizer
from probe_lightning.sampling import GenerationConfig


class EntropyProbeCallback(ProbeAdapter, TrainerCallback):
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
        self.probe = InTrainingProbe(every_n_steps, B_E, G_E, B_V, seed, name=type(self).__name__)
        self.output_dir = output_dir
        self.tf_batch_size, self.gen_batch_size = tf_batch_size, gen_batch_size
        self.trainer = None
        self._trainer_batch: dict[str, torch.Tensor] | None = None  # the latest generation batch

    # ---- the trainer's events ----

    def on_init_end(self, args, state, control, **kwargs):
        self.trainer = self.trainer or _calling_trainer(self)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.trainer = self.trainer or _calling_trainer(self)
        reason = self._refusal(args, optimizer)
        if reason:
            self.probe.disable(reason)
            return
        generate_and_score = self.trainer._generate_and_score_completions

        def keeping_the_batch(inputs):
            output = generate_and_score(inputs)
            keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
            self._trainer_batch = {k: output[k].detach() for k in keep if isinstance(output.get(k), torch.Tensor)}
            return output

        self.trainer._generate_and_score_completions = keeping_the_batch

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self.probe.due(state.global_step):
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.probe.before_step(
            model, self.trainer.processing_class, self.generation_config(), optimizer, state.global_step,
            self.prompt_batch, trainer_tokens=lambda: self._trainer_tokens(model),
        )  # fmt: skip

    def on_optimizer_step(self, args, state, control, **kwargs):
        row = self.probe.after_step()
        if row is not None:
            self._log(row)
            self.probe.write_table(self._folder())

    def on_train_end(self, args, state, control, **kwargs):
        self.probe.write_plot(self._folder())

    # ---- what the probe takes from the trainer ----

    def prompt_batch(self, role: str, step: int) -> PromptBatch:
        """The E (B_E) or V (B_V) prompts of the probe at `step`: rows of the trainer's train_dataset
        (InTrainingProbe.prompt_batch: seeded by (seed, step, role), responses by (seed, step, role, row, g))."""
        return self.probe.prompt_batch(self.trainer.train_dataset, role, step)

    def generation_config(self) -> GenerationConfig:
        """The trainer's sampling: temperature, top_p, max_completion_length, its EOS ids."""
        args, tokenizer = self.trainer.args, self.trainer.processing_class
        eos = list(getattr(self.trainer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        return GenerationConfig(
            max_new_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos,
            tf_batch_size=self.tf_batch_size, gen_batch_size=self.gen_batch_size,
        )  # fmt: skip

    def _trainer_tokens(self, model: torch.nn.Module) -> TrainerTokens | None:
        """(log π(y_t), A(y_t)) over the completion tokens of the trainer's generation batch (log π at θ and the
        trainer's temperature, teacher-forced without gradients); None without one."""
        batch = self._trainer_batch
        if not batch or "advantages" not in batch:
            return None
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        width = batch["completion_ids"].shape[1]
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1 : -1]
            logprobs = (logits.float() / self.trainer.args.temperature).log_softmax(-1)
            logprobs = logprobs.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
        mask = batch["completion_mask"].bool()
        advantages = batch["advantages"].double()[:, None].expand_as(logprobs)
        return logprobs.double()[mask], advantages[mask]

    # ---- plumbing ----

    def _refusal(self, args, optimizer) -> str | None:
        trainer = self.trainer
        if trainer is None or not hasattr(trainer, "_generate_and_score_completions"):
            name = type(trainer).__name__ if trainer is not None else "unknown"
            return f"trainer {name} is not a policy-gradient (GRPO-style) trainer"
        accelerator = trainer.accelerator
        if getattr(accelerator, "is_fsdp2", False) or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            return "a sharded strategy (FSDP/DeepSpeed) holds only a shard of each parameter on a process"
        # The probe samples q = softmax(z / temperature), then top-p: a sampling setting beyond those changes q.
        sampling = {"top_k": (getattr(args, "top_k", 0), (0, None)), "min_p": (getattr(args, "min_p", None), (0, None)),
                    "repetition_penalty": (getattr(args, "repetition_penalty", 1.0), (1.0,)),
                    "generation_kwargs": (getattr(args, "generation_kwargs", None), (None, {}))}  # fmt: skip
        unmodelled = [f"{name}={value!r}" for name, (value, neutral) in sampling.items() if value not in neutral]
        if unmodelled:
            return f"trainer sampling {', '.join(unmodelled)}: the probe samples with temperature and top_p only"
        return unsupported_optimizer(optimizer)

    def _log(self, row: dict) -> None:
        """Into TRL's metrics of this step, so they land in its next log beside TRL's `entropy`."""
        metrics = getattr(self.trainer, "_metrics", None)
        for key in KEYS:
            if metrics is not None:
                metrics["train"][f"entropy_probe/{key}"].append(row[key])
        if metrics is None:
            self.trainer.log({f"entropy_probe/{key}": row[key] for key in KEYS})

    def _folder(self) -> Path:
        return Path(self.output_dir or Path(self.trainer.args.output_dir) / "entropy_probe")


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
