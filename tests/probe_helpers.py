"""Shared helpers for tests that drive the Probe directly (no Lightning) in the enumerable world."""

import math
from dataclasses import replace

import torch

from probe_lightning.build import build_probe
from probe_lightning.checkpoints import load_checkpoint
from probe_lightning.config import TrainerConfig
from probe_lightning.data import PromptBatch
from probe_lightning.models import load_model_and_tokenizer
from probe_lightning.probe import Probe
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor
from probe_lightning.settings import ProbeSettings

# Only the output layer is trainable in the exactness tests, which keeps the noise of ⟨X̄, Ȳ⟩ low
# enough for tests with power.
TRAINABLE = ("lm_head",)
# The seed's own step: A_g / L_max, no reward scaling, no clipping (E[Ȳ] = (1 - 1/G) ∇E[r] / T exactly).
SEED_TRAINER = TrainerConfig(loss_type="seed", scale_rewards="none", max_grad_norm=0)


def make_probe(
    world: str, tf_batch_size: int = 256, trainable: tuple[str, ...] | None = TRAINABLE, dtype=None, probe_class=Probe,
    **settings,
) -> Probe:
    """A Probe on the world model (the seed's step and target unless told otherwise); `trainable`: name
    prefixes of the trainable parameters (None: all)."""
    generation = GenerationConfig(max_new_tokens=3, tf_batch_size=tf_batch_size, gen_batch_size=256)
    defaults = dict(
        model=world, G=4, learning_rate=1.0, generation=generation, trainer=SEED_TRAINER, entropy_target="dr_grpo",
        estimator="naive",
    )  # fmt: skip
    settings = ProbeSettings(**{**defaults, **settings})
    checkpoint = None
    if settings.checkpoint:
        checkpoint = load_checkpoint(settings.checkpoint, settings.model, settings.update != "identity")
        model, tokenizer = checkpoint.model, checkpoint.tokenizer
    else:
        model, tokenizer = load_model_and_tokenizer(world, dtype=dtype)
    if trainable is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(trainable))
    probe = build_probe(SequenceProcessor(model, tokenizer, settings.generation), settings, checkpoint)
    if probe_class is not Probe:  # a test's subclass, on the same parts
        parts = (probe.processor, probe.make_rollout, probe.named_params, probe.geometry, settings, probe.results)
        probe = probe_class(*parts)
    return probe


def prompt_batches(
    probe_index, entropy_prompts, update_prompts, rollout_batch_size, evaluation_prompts=(), seed=0
) -> list[PromptBatch]:
    """The DataModule's batch order: E batches, V batches (if any), then U batches, the last one closing the
    probe. seed: the data seed, which with probe, role and prompt id seeds each response's sampling."""
    batches = []
    for role, prompts in (("E", entropy_prompts), ("V", evaluation_prompts), ("U", update_prompts)):
        for start in range(0, len(prompts), rollout_batch_size):
            chunk = prompts[start : start + rollout_batch_size]
            batches.append(
                PromptBatch(
                    probe_index=probe_index,
                    role=role,
                    questions=[p.question for p in chunk],
                    answers=[p.answer for p in chunk],
                    prompt_ids=list(range(start, start + len(chunk))),
                    last_in_probe=False,
                    seed=seed,
                )
            )
    batches[-1] = replace(batches[-1], last_in_probe=True)
    return batches


def run_probes(probe: Probe, num_probes: int, entropy_prompts, update_prompts, rollout_batch_size=256, seed=0):
    """(per-probe results, per-probe X̄, per-probe Ȳ), X̄ and Ȳ in float64."""
    x_bars, y_bars = [], []
    for k in range(num_probes):
        for batch in prompt_batches(k, entropy_prompts, update_prompts, rollout_batch_size, seed=seed):
            probe.step(batch)
        x_bars.append([x.double() for x in probe.vectors.x_bar])
        y_bars.append([y.double() for y in probe.vectors.y_bar])
    return probe.results.probes, x_bars, y_bars


def z_score(values: torch.Tensor, exact: float) -> tuple[float, float]:
    """(|mean - exact| / SE of the mean, SE of the mean)."""
    se = values.std().item() / math.sqrt(len(values))
    return abs(values.mean().item() - exact) / se, se


def head_adam_state(path):
    """A real AdamW state (one step) of the eos world's output layer [7, 16], saved at path; returns path."""
    head = torch.nn.Parameter(torch.randn(7, 16, generator=torch.Generator().manual_seed(0)))
    optimizer = torch.optim.AdamW([head])
    head.grad = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    optimizer.step()
    torch.save(optimizer.state_dict(), path)
    return path
