"""The probe's ∇J̄ is the trainer's: TRL's loss types, reward scalings and clipping, over rollout batches
and microbatches, in a world with EOS (lengths vary, so every normaliser matters).

tests/test_trainer_loss.py proves token_coefficients against TRL's own GRPOTrainer loss; here the probe,
which splits the U batch into rollout batches and microbatches and applies the batch-level factors at the
end, is held against token_coefficients over the whole U batch as one tensor.
"""

import pytest
import torch
import torch.nn.functional as F
from enumerable_world import PROMPTS
from eos_world import save_eos_world
from probe_helpers import make_probe, prompt_batches

from probe_lightning import estimators
from probe_lightning.config import TrainerConfig
from probe_lightning.trainer_loss import advantages, token_coefficients

pytestmark = pytest.mark.usefixtures("one_thread")
G = 3


@pytest.fixture(scope="module")
def eos_world(tmp_path_factory) -> str:
    return save_eos_world(tmp_path_factory.mktemp("eos_world"))


def run_probe(world, **trainer):
    """One probe with E = PROMPTS and U = PROMPTS * 2 in rollout batches of 3 prompts, one prompt per forward."""
    probe = make_probe(
        world, tf_batch_size=G, G=G, G_E=2, update="identity", standard_error=False, entropy_target="budget",
        trainer=TrainerConfig(**trainer),
    )  # fmt: skip
    outputs = [probe.step(batch) for batch in prompt_batches(0, PROMPTS, PROMPTS * 2, rollout_batch_size=3, seed=11)]
    return probe, [out.rollout for out in outputs if out.rollout.role == "U"], outputs[-1].finished


def whole_batch_grad_j(probe, rollouts, loss_type, scale_rewards, max_completion_length=3):
    """∇ Σ c · log q with c = token_coefficients of the whole U batch as one tensor (TRL's view of the step)."""
    width = max(r.batch.response_mask.shape[-1] for r in rollouts)
    masks = torch.cat([F.pad(r.batch.response_mask, (0, width - r.batch.response_mask.shape[-1])) for r in rollouts])
    rewards = torch.cat([r.rewards for r in rollouts])
    max_lengths = torch.cat([r.max_lengths for r in rollouts])
    advantage = advantages(rewards, scale_rewards)
    coefficients = token_coefficients(
        advantage, masks, loss_type, max_completion_length=max_completion_length, max_lengths=max_lengths
    )
    params = [p for _, p in probe.named_params]
    total, start = [torch.zeros_like(p) for p in params], 0
    for rollout in rollouts:
        B, R = rollout.batch.num_prompts, rollout.batch.response_mask.shape[-1]
        tf = probe.processor.teacher_force_logprobs(rollout.batch, with_grad=True)
        loss = (coefficients[start : start + B, :, :R] * tf.token_logprobs).sum()
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t += g
        start += B
    return total


def relative_error(a, b) -> float:
    a, b = torch.cat([x.flatten().double() for x in a]), torch.cat([x.flatten().double() for x in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scale_rewards", ["none", "group", "batch"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "seed"])
def test_grad_j_is_the_whole_batch_trainer_gradient(eos_world, loss_type, scale_rewards):
    probe, rollouts, result = run_probe(eos_world, loss_type=loss_type, scale_rewards=scale_rewards, max_grad_norm=0)
    assert sum(r.rewards.std(dim=1).gt(0).sum().item() for r in rollouts) > 0, "no mixed group: ∇J̄ = 0"
    expected = whole_batch_grad_j(probe, rollouts, loss_type, scale_rewards)
    assert estimators.norm(expected) > 0
    assert relative_error(probe.vectors.grad_j, expected) < 1e-6
    assert result.clip_factor == 1.0


def test_clipping_scales_grad_j_to_max_grad_norm(eos_world):
    probe, rollouts, result = run_probe(eos_world, loss_type="dapo", scale_rewards="group", max_grad_norm=1e-3)
    unclipped = estimators.norm(whole_batch_grad_j(probe, rollouts, "dapo", "group"))
    assert result.clip_factor == pytest.approx(1e-3 / (unclipped + 1e-6), rel=1e-6)
    assert estimators.norm(probe.vectors.grad_j) == pytest.approx(1e-3 * unclipped / (unclipped + 1e-6), rel=1e-6)
    assert result.delta_h1 == pytest.approx(estimators.dot(probe.vectors.x_bar, probe.vectors.grad_j))


def test_a_kl_term_is_refused_naming_the_setting(eos_world):
    with pytest.raises(ValueError, match="beta=0.04: the KL term"):
        make_probe(eos_world, trainer=TrainerConfig(beta=0.04))
