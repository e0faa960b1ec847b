"""Directional derivatives by forward-mode AD: the standard error's b_u and the token contributions.

One jvp per microbatch gives, for every prompt, response or token at once, the derivative of a per-sample
quantity along a fixed parameter direction: the probe differentiates each U token's log q (and, with an
entropy bonus, its entropy H_t) along v = P ⊙ X̄ (b_u and the token contributions). No per-sample gradient is formed. (E's a_e come from the
E pass's own gradients, Probe.accumulate; tests use this pass for E too, as an independent check.)
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from probe_lightning.accumulator import NamedParams
from probe_lightning.rollout import Rollout
from probe_lightning.sequence_processor import BatchedSequences, SequenceProcessor, TeacherForcing


@contextmanager
def forward_mode_attention(model):
    """Inside the block, `model` attends through PyTorch's scaled_dot_product_attention with its math
    backend: forward-mode AD is not implemented for the fused (flash, memory-efficient) kernels, and the
    transformers eager path turns a float64 model's fully masked padding rows into NaN."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        model.set_attn_implementation(saved)


def directional_derivatives(
    processor: SequenceProcessor,
    named_params: NamedParams,
    rollouts: list[Rollout],
    direction: list[torch.Tensor],
    outputs: Callable[[Rollout, TeacherForcing], torch.Tensor],
) -> list[tuple[Rollout, torch.Tensor]]:
    """Per microbatch of each rollout: (the microbatch, the derivative of outputs(microbatch, its teacher
    forcing) along direction, float64)."""
    along = _along(processor, named_params, direction)
    results = []
    with forward_mode_attention(processor.model):
        for rollout in rollouts:
            for rows in processor.microbatches(rollout.batch.num_prompts, rollout.batch.num_responses_per_prompt):
                micro = rollout.select(rows)
                results.append((micro, along(micro.batch, lambda tf, micro=micro: outputs(micro, tf))))
    return results


def token_derivatives(
    processor: SequenceProcessor,
    named_params: NamedParams,
    batches: list[BatchedSequences],
    direction: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Per batch: the derivative of its response tokens' (log q, H_t) along direction, [2, B, G, R] float64."""
    along = _along(processor, named_params, direction)
    with forward_mode_attention(processor.model):
        return [along(batch, lambda tf: torch.stack([tf.token_logprobs, tf.token_entropies])) for batch in batches]


def _along(processor: SequenceProcessor, named_params: NamedParams, direction: list[torch.Tensor]) -> Callable:
    """(batch, outputs of its teacher forcing) -> their derivative along direction: one jvp (float64)."""
    names = [n for n, _ in named_params]
    primals = tuple(p.detach() for _, p in named_params)
    tangents = tuple(d.to(p.dtype) for d, p in zip(direction, primals, strict=True))  # one copy, not per batch

    def along(batch: BatchedSequences, outputs: Callable[[TeacherForcing], torch.Tensor]) -> torch.Tensor:
        def output(*params):
            return outputs(processor.teacher_force_logprobs(batch, parameters=dict(zip(names, params))))

        return torch.func.jvp(output, primals, tangents)[1].double()

    return along
