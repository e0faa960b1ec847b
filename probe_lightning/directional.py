"""Directional derivatives of per-prompt losses by forward-mode AD: the standard error's a_e and b_u.

a_e = ⟨X(p_e), Ȳ⟩ is the derivative of L_X(p_e) along Ȳ; b_u = ⟨v, ∇J(p_u)⟩ the derivative of L_Y(p_u)
along v (e.g. P ⊙ X̄). One jvp per microbatch gives a whole microbatch's; no per-sample gradient is formed.
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch

from probe_lightning.accumulator import NamedParams
from probe_lightning.rollout import Rollout
from probe_lightning.sequence_processor import SequenceProcessor, TeacherForcing


@contextmanager
def eager_attention(model):
    """Run `model` with the plain-PyTorch attention implementation inside the block: forward-mode AD
    is not implemented for the fused CPU/GPU attention kernels."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def directional_derivatives(
    processor: SequenceProcessor,
    named_params: NamedParams,
    rollouts: list[Rollout],
    directions: dict[str, list[torch.Tensor]],
    rollout_loss: Callable[[Rollout, TeacherForcing], torch.Tensor],
) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """Per role, (the derivative of each prompt's loss along directions[role] in float64, its prompt ids).

    rollout_loss(rollout, its teacher forcing) -> [B] per-prompt losses (L_X for role E, L_Y for role U).
    """
    names = [n for n, _ in named_params]
    primals = tuple(p.detach() for _, p in named_params)
    derivatives = {role: [] for role in directions}
    prompt_ids = {role: [] for role in directions}
    with eager_attention(processor.model):
        for rollout in rollouts:
            tangents = tuple(d.to(p.dtype) for d, p in zip(directions[rollout.role], primals))
            for rows in processor.microbatches(rollout.batch.num_prompts, rollout.batch.num_responses_per_prompt):
                micro = rollout.select(rows)

                def loss(*params, micro=micro):
                    tf = processor.teacher_force_logprobs(micro.batch, parameters=dict(zip(names, params)))
                    return rollout_loss(micro, tf)

                _, derivative = torch.func.jvp(loss, primals, tangents)
                derivatives[rollout.role].append(derivative.double())
                prompt_ids[rollout.role].extend(micro.prompt_ids)
    return {role: (torch.cat(derivatives[role]), prompt_ids[role]) for role in directions}
