"""EntropyProbeCallback: the entropy probe inside a Lightning run that trains a policy (a pl.Callback).

    trainer = pl.Trainer(..., gradient_clip_val=1.0, callbacks=[EntropyProbeCallback(
        prompts=train_prompts, tokenizer=tokenizer, generation=GenerationConfig(max_new_tokens=256),
        every_n_steps=10, B_E=16, G_E=4, B_V=16,
    )])

For a LightningModule that holds a Hugging Face causal LM (its attribute `model_attribute`, "model" by default) and
trains it with one torch.optim.Adam/AdamW optimizer and automatic optimization. A thin adapter of
core.InTrainingProbe (what is computed, and how training stays untouched) to Lightning's hooks: the probe at
on_before_optimizer_step, the true change at on_train_batch_end, once θ′ is in the model.

Lightning calls on_before_optimizer_step before it clips the gradients (Precision._after_closure), so the
gradient the probe's AdamW step takes is p.grad clipped as the Trainer is about to clip it (gradient_clip_val,
gradient_clip_algorithm "norm" or "value", over the optimizer's parameters, as torch.nn.utils.clip_grad_norm_ /
clip_grad_value_ do), computed on copies: p.grad itself is left alone.

Lightning knows nothing of prompts or sampling, so the callback is given them:
- prompts: the pool the E and V prompts are drawn from, as the policy is trained on: a sequence of prompts
  (text, or chat messages) or of rows with a "prompt" column (a datasets.Dataset);
- tokenizer: the policy's, which tokenizes a prompt as TRL does (data.prompt_token_ids);
- generation: how the policy samples (sampling.GenerationConfig: max_new_tokens, temperature, top_p, EOS);
  the E and V responses are sampled from q with it.

Logged with pl_module.log at each probed step: entropy_probe/delta_h1, _se, delta_h_true, _se and
covariance_proxy. The covariance proxy −η Cov(log π, A) needs the trainer's own tokens: when training_step returns
{"loss": ..., "token_logprobs": ..., "advantages": ...} (flat tensors over its response tokens: log π(y_t) at θ,
detached, and A(y_t)), it is over those; NaN otherwise. probes.parquet and, when training ends,
predicted_vs_realized.png go to output_dir (None: the trainer's log_dir/entropy_probe).

Refused with one warning, training going on without the probe: an optimizer other than Adam/AdamW (or more than
one), a strategy other than one device or DDP (FSDP, DeepSpeed hold shards of the parameters), manual
optimization (the step is not Lightning's to clip and may come more than once a batch), and a LightningModule that
overrides configure_gradient_clipping (its clipping is unknown to the probe).
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from probe_lightning.data import PromptBatch
from probe_lightning.distributed import SUPPORTED_STRATEGIES
from probe_lightning.integrations.core import KEYS, InTrainingProbe, ProbeAdapter, TrainerTokens
from probe_lightning.integrations.live_optimizer import unsupported_optimizer
from probe_lightning.sampling import GenerationConfig


class EntropyProbeCallback(ProbeAdapter, pl.Callback):
    def __init__(
        self,
        prompts: Sequence,
        tokenizer,
        generation: GenerationConfig,
        every_n_steps: int = 10,
        B_E: int = 16,
        G_E: int = 4,
        B_V: int = 16,
        seed: int = 0,
        output_dir: str | None = None,
        model_attribute: str = "model",
    ):
        """See the module docstring; B_E, G_E, B_V: E prompts, responses per E (and V) prompt, V prompts."""
        self.probe = InTrainingProbe(every_n_steps, B_E, G_E, B_V, seed, name=type(self).__name__)
        self.prompts, self.tokenizer, self.generation = prompts, tokenizer, generation
        self.output_dir, self.model_attribute = output_dir, model_attribute
        self.folder: Path | None = None  # where the table and the plot go, known once training starts

    def prompt_batch(self, role: str, step: int) -> PromptBatch:
        """The E (B_E) or V (B_V) prompts of the probe at `step`, drawn from `prompts`
        (InTrainingProbe.prompt_batch: seeded by (seed, step, role), responses by (seed, step, role, row, g))."""
        return self.probe.prompt_batch(self.prompts, role, step)

    # ---- Lightning's hooks ----

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder = Path(self.output_dir or Path(trainer.log_dir) / "entropy_probe")  # log_dir: on every rank
        reason = self._refusal(trainer, pl_module)
        if reason and not self.probe.disabled:
            self.probe.disable(reason)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self.probe.due(trainer.global_step):
            return
        self.probe.before_step(
            getattr(pl_module, self.model_attribute), self.tokenizer, self.generation, optimizer, trainer.global_step,
            self.prompt_batch, gradients=optimizer_gradients(trainer, optimizer),
        )  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        def trainer_tokens() -> TrainerTokens | None:  # training_step's, when it returns them
            if isinstance(outputs, dict) and {"token_logprobs", "advantages"} <= outputs.keys():
                return outputs["token_logprobs"], outputs["advantages"]
            return None

        row = self.probe.after_step(trainer_tokens=trainer_tokens)
        if row is None:
            return
        pl_module.log_dict({f"entropy_probe/{key}": row[key] for key in KEYS}, on_step=True, on_epoch=False)
        self.probe.write_table(self.folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.write_plot(self.folder)

    # ---- plumbing ----

    def _refusal(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        strategy = type(trainer.strategy).__name__
        if strategy not in SUPPORTED_STRATEGIES:
            return (f"trainer.strategy {strategy}: the probe needs every parameter whole on each process "
                    f"(supported: {', '.join(SUPPORTED_STRATEGIES)})")  # fmt: skip
        if not pl_module.automatic_optimization:
            return "manual optimization: the probe reads the step Lightning's automatic optimization takes and clips"
        if is_overridden("configure_gradient_clipping", pl_module):
            return "the LightningModule overrides configure_gradient_clipping: the probe cannot know the clipped step"
        if not isinstance(getattr(pl_module, self.model_attribute, None), torch.nn.Module):
            return f"the LightningModule has no model {self.model_attribute!r} (the policy: pass model_attribute)"
        if len(trainer.optimizers) != 1:
            return f"{len(trainer.optimizers)} optimizers: the probe reads the step of one Adam/AdamW optimizer"
        return unsupported_optimizer(trainer.optimizers[0])


def optimizer_gradients(trainer: pl.Trainer, optimizer) -> Callable[[list[torch.Tensor]], list[torch.Tensor | None]]:
    """params ↦ the gradients optimizer.step() will receive for them: p.grad clipped as the Trainer clips it after
    on_before_optimizer_step (Precision.clip_gradients, over every parameter of the optimizer), on copies."""
    limit = trainer.gradient_clip_val

    def clipped(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        grads = [p.grad for p in params]
        if not limit or limit <= 0:
            return grads
        if trainer.gradient_clip_algorithm == "value":  # clip_grad_value_
            return [None if g is None else g.clamp(-limit, limit) for g in grads]
        # clip_grad_norm_: g · min(1, limit / (‖g‖ + 1e-6)), ‖g‖ the 2-norm over every gradient of the optimizer
        every = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not every:
            return grads
        device = every[0].device
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(device) for g in every]))
        factor = (limit / (total + 1e-6)).clamp(max=1.0)
        return [None if g is None else g * factor.to(g.device) for g in grads]

    return clipped
