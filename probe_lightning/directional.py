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
from probe_lightning.sequence_processor import SequenceProcessor, TeacherForcing


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
    names = [n for n, _ in named_params]
    primals = tuple(p.detach() for _, p in named_params)
    tangents = tuple(d.to(p.dtype) for d, p in zip(direction, primals, strict=True))  # one copy, not per rollout
    results = []
    with forward_mode_attention(processor.model):
        for rollout in rollouts:
            for rows in processor.microbatches(rollout.batch.num_prompts, rollout.batch.num_responses_per_prompt):
                micro = rollout.select(rows)

                def output(*params, micro=micro):
                    tf = processor.teacher_force_logprobs(micro.batch, parameters=dict(zip(names, params)))
                    return outputs(micro, tf)

                _, derivative = torch.func.jvp(output, primals, tangents)
                results.append((micro, derivative.double()))
    return results
