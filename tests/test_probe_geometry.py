"""The probe with an optimizer state: Adam preconditioning against the exact answer, AdamW steps,
and a real HF Trainer checkpoint driven through the probe."""

import pytest
import torch
from enumerable_world import PROMPTS, exact_delta_h1, exact_prompt
from probe_helpers import make_probe, run_probes, z_score
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from probe_lightning import estimators
from probe_lightning.optimizer_state import load_optimizer_state

pytestmark = pytest.mark.usefixtures("one_thread")
# As in test_unbiasedness: the same prompts in E and U, sampled independently.
ENTROPY_PROMPTS, UPDATE_PROMPTS = PROMPTS * 8, PROMPTS * 12


@pytest.fixture(scope="module")
def lm_head_adam_state(world, tmp_path_factory) -> str:
    """A real AdamW state for the world's output layer after three steps on random gradients."""
    head = AutoModelForCausalLM.from_pretrained(world).lm_head.weight
    optimizer = torch.optim.AdamW([head], lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        head.grad = torch.randn(head.shape, generator=generator) * torch.linspace(0.1, 3, head.shape[1])
        optimizer.step()
    path = tmp_path_factory.mktemp("optimizer") / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    return str(path)


def test_adam_preconditioned_delta_h1_is_unbiased(world, lm_head_adam_state):
    probe = make_probe(world, optimizer_state=lm_head_adam_state, update="adam_precondition", breakdown_se=False)
    assert probe.results.info.update == "adam_precondition"
    states = load_optimizer_state(lm_head_adam_state, probe.named_params).adam_states
    exact_prompts = [exact_prompt(probe.processor.model, probe.processor.tokenizer, p) for p in PROMPTS]
    exact, _, _ = exact_delta_h1(exact_prompts, exact_prompts, 4, 1.0, [s.preconditioner() for s in states])
    results, _, _ = run_probes(probe, 200, ENTROPY_PROMPTS, UPDATE_PROMPTS, seed=99)
    values = torch.tensor([r.delta_h1 for r in results], dtype=torch.float64)
    z, se = z_score(values, exact)
    assert se < 0.1 * abs(exact), f"no power: SE {se:.3g} vs exact {exact:.3g}"
    assert z < 3, f"mean {values.mean():.5g} vs exact {exact:.5g}: {z:.2f} SE apart"


def test_with_an_adam_state_the_default_update_is_the_adamw_step(world, lm_head_adam_state):
    assert make_probe(world, optimizer_state=lm_head_adam_state).results.to_dict()["update"] == "adamw_step"
    assert make_probe(world).results.to_dict()["update"] == "identity"


def test_adamw_step_update_is_the_step_torch_adamw_takes(world, lm_head_adam_state):
    probe = make_probe(world, optimizer_state=lm_head_adam_state, update="adamw_step", learning_rate=0.01)
    (result,), (x_bar,), (y_bar,) = run_probes(probe, 1, ENTROPY_PROMPTS, UPDATE_PROMPTS)
    (param,) = [p for _, p in probe.named_params]
    clone = torch.nn.Parameter(param.detach().clone())
    optimizer = torch.optim.AdamW([clone])
    optimizer.load_state_dict(torch.load(lm_head_adam_state, weights_only=True))
    optimizer.param_groups[0]["lr"] = 0.01  # a configured η replaces the saved rate
    clone.grad = -probe.vectors.grad_j[0]  # the trainer minimises -J
    optimizer.step()
    # float32 θ_new - θ: a few ulp of θ (~3e-8 here) of rounding
    torch.testing.assert_close(y_bar[0], (clone - param).detach().double(), rtol=1e-5, atol=1e-7)
    assert result.delta_h1 == pytest.approx(estimators.dot(x_bar, y_bar))
    assert any("momentum drift" in note for note in probe.results.info.notes)


def test_hf_trainer_checkpoint_runs_through_the_probe(tmp_path, world):
    model = AutoModelForCausalLM.from_pretrained(world)
    ids = torch.randint(1, 6, (8, 6), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=dataset).train()
    probe = make_probe(
        world, checkpoint=str(tmp_path / "checkpoint-2"), G=2, update="adamw_step", learning_rate=None, trainable=None
    )
    info = probe.results.info
    assert info.checkpoint_format == "hf_full" and info.global_step == 2
    assert info.learning_rate == pytest.approx(1e-3) and "param group" in info.learning_rate_source
    (result,), _, _ = run_probes(probe, 1, ENTROPY_PROMPTS, UPDATE_PROMPTS)
    assert result.delta_h1 != 0 and result.B_U == len(PROMPTS) * 12
