"""The probe's step is TRL's step: proof against a real GRPOTrainer run (issue 19, item 4).

For each case (full fine-tuning or LoRA, loss dapo or grpo, gradient clipping active or not) a tiny model is
trained by trl.GRPOTrainer on CPU with a checkpoint after every step (tests/trl_runs.py). Step N + 1's
generation batch (completions, masks, rewards) is written as the probe's saved rollouts
(probe_lightning/trainer_batch.py) and replayed on checkpoint-N with --model.save_vectors true and
--model.next_checkpoint checkpoint-N+1. Then

- grad_loss (what the probe says p.grad holds before optimizer.step()) is the gradient TRL really had at
  on_pre_optimizer_step;
- update (the predicted Δθ) is torch's AdamW step, re-enacted in float64 from checkpoint-N's optimizer.pt
  and TRL's gradient;
- θ_{N+1} − θ_N read from the two checkpoints is that update, up to the float32 rounding of θ + Δθ;
- results.json's next-checkpoint report says so.

Both the probe and TRL compute in float32, each within ~2e-5 (relative L2) of the float64 gradient on these
tiny models, so they are held to each other at 1e-4. Everything is compared in float64, keyed by the
checkpoint's weights-file keys.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from cli_helpers import results_file
from trl_runs import (
    G,
    PROMPTS,
    TrlCase,
    adamw_step,
    base_model_folder,
    checkpoint_weights,
    group_advantages,
    run_grpo,
    trl_gradient,
)

import train
from probe_lightning.config import ProbeConfigError
from probe_lightning.rollout_store import saved_batches, saved_prompts
from probe_lightning.sampling import GenerationConfig
from probe_lightning.trainer_batch import TrainerBatch, prompt_groups, save_trainer_batch

ROOT = Path(__file__).parents[1]
CASES = [
    TrlCase(finetuning, loss_type, clipped)
    for finetuning in ("full", "lora")
    for loss_type in ("dapo", "grpo")
    for clipped in (True, False)
]
FLOAT32_TOL = 5e-5  # a float32 computation against the float64 one (measured here: up to 2e-5)
REL_TOL, COS_TOL = 1e-4, 0.99999  # two float32 computations of one float64 quantity
STEP_COS_TOL = 0.9999  # a step read back from float32 weights
ROUNDINGS_PER_STEP = 2  # torch's AdamW writes θ twice: θ·(1 − η·wd), then + the Adam step


def flat(vectors: dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([vectors[key].double().flatten() for key in keys])


def relative_error(measured: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """‖measured − reference‖ / ‖reference‖ over all tensors (float64); both must hold the same keys."""
    assert measured.keys() == reference.keys()
    a, b = flat(measured, reference), flat(reference, reference)
    return ((a - b).norm() / b.norm()).item()


def cosine(measured: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert measured.keys() == reference.keys()
    return torch.nn.functional.cosine_similarity(flat(measured, reference), flat(reference, reference), dim=0).item()


def step_tolerance(recorded, update: dict[str, torch.Tensor]) -> float:
    """How far θ_{N+1} − θ_N may be from Δθ = update (relative L2): the rounding of fl32(θ_N + Δθ) − θ_N
    measured on this step, once per write of θ, plus the probe's own tolerance."""
    before = checkpoint_weights(recorded.checkpoint)
    rounded = {key: (before[key] + update[key].float()).double() - before[key].double() for key in update}
    return ROUNDINGS_PER_STEP * relative_error(rounded, update) + REL_TOL


def trainer_batch(recorded, rows: torch.Tensor | None = None) -> TrainerBatch:
    """The recorded batch (its rows[rows], in that order) with TRL's names."""
    batch = recorded.batch
    rows = torch.arange(len(recorded.prompts)) if rows is None else rows
    return TrainerBatch(
        prompt_ids=batch["prompt_ids"][rows],
        prompt_mask=batch["prompt_mask"][rows],
        completion_ids=batch["completion_ids"][rows],
        completion_mask=batch["completion_mask"][rows],
        rewards=recorded.rewards[rows],
        prompts=[recorded.prompts[r] for r in rows.tolist()],
    )


def save_rollouts(recorded, tokenizer, base_folder, folder, rows=None) -> None:
    eos = recorded.eos_token_ids
    sampling = GenerationConfig(
        max_new_tokens=recorded.args.max_completion_length,
        temperature=recorded.args.temperature,
        top_p=recorded.args.top_p,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        stop_strings=[],
    )
    save_trainer_batch(
        folder, trainer_batch(recorded, rows), G, tokenizer, str(base_folder), str(recorded.checkpoint), sampling
    )


def replay(recorded, base_folder, tokenizer, folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(results.json, vectors_probe0.safetensors by kind and key) of the probe replaying step N + 1's batch on
    checkpoint-N, with checkpoint-N+1 as the next checkpoint; every trainer setting from training_args.bin."""
    save_rollouts(recorded, tokenizer, base_folder, folder / "rollouts")
    train.main([
        "predict", "--config", str(ROOT / "configs" / "sp.yaml"),
        "--model.model", str(base_folder),
        "--model.checkpoint", str(recorded.checkpoint),
        "--model.next_checkpoint", str(recorded.next_checkpoint),
        "--model.save_vectors", "true",
        "--model.G", "null", "--model.generation.max_new_tokens", "null",  # the checkpoint's, as every setting
        "--model.generation.stop_strings", "[]",
        "--data.rollouts", str(folder / "rollouts"), "--data.B_E", "2",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(folder / "logs"),
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    path = results_file(folder / "logs")
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(path.with_name("vectors_probe0.safetensors")).items():
        kind, key = name.split("/", 1)
        vectors.setdefault(kind, {})[key] = tensor
    return json.loads(path.read_text()), vectors


@pytest.fixture(scope="module")
def base_folder(tokenizer, tmp_path_factory):
    return base_model_folder(tokenizer, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module", params=CASES, ids=str)
def recorded(request, base_folder, tokenizer, tmp_path_factory):
    """Step N + 1 of a real GRPOTrainer run of this case."""
    return run_grpo(request.param, base_folder, tokenizer, tmp_path_factory.mktemp(str(request.param)))


@pytest.fixture(scope="module")
def replayed(recorded, base_folder, tokenizer, tmp_path_factory):
    return replay(recorded, base_folder, tokenizer, tmp_path_factory.mktemp(f"replay-{recorded.case}"))


# ---- the recorded step is TRL's ----


def test_recorded_rewards_reproduce_trls_advantages(recorded):
    advantages = recorded.batch["advantages"]
    torch.testing.assert_close(group_advantages(recorded.rewards), advantages, rtol=1e-6, atol=1e-6)
    lengths = recorded.batch["completion_mask"].sum(dim=1)
    assert lengths.min() < lengths.max() == recorded.args.max_completion_length  # truncated ones stay in
    assert (advantages.view(-1, G).abs().sum(dim=1) > 0).sum() >= 2  # groups with mixed rewards


def test_trls_gradient_is_the_gradient_of_its_loss_on_its_batch(recorded, base_folder):
    """Recomputed in float64 from checkpoint-N and the recorded batch, TRL's formulas, torch's clipping."""
    exact, norm_before_clipping = trl_gradient(recorded, base_folder, torch.float64)

    assert relative_error(recorded.gradient, exact) <= FLOAT32_TOL
    assert cosine(recorded.gradient, exact) >= COS_TOL
    assert (norm_before_clipping > recorded.case.max_grad_norm) == recorded.case.clipped


def test_saved_rollouts_are_trls_rows_grouped_by_prompt_whatever_their_order(
    recorded, tokenizer, base_folder, tmp_path
):
    """TRL shuffles rows before the loss: rows written in any order come back as each prompt's G completions,
    as TRL's input_ids and attention_mask, with TRL's rewards."""
    shuffled = torch.randperm(len(PROMPTS) * G, generator=torch.Generator().manual_seed(1))
    save_rollouts(recorded, tokenizer, base_folder, tmp_path, rows=shuffled)

    (columns, sequences, last_in_probe), *more = list(saved_batches(tmp_path))

    assert more == [] and last_in_probe and set(columns["role"]) == {"U"}
    assert sorted(columns["question"]) == sorted(PROMPTS) and saved_prompts(columns) == columns["question"]
    batch = recorded.batch
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    for b, question in enumerate(columns["question"]):
        rows = [r for r, prompt in enumerate(recorded.prompts) if prompt == question]
        trl_rows = sorted(zip(input_ids[rows].tolist(), attention_mask[rows].tolist(), recorded.rewards[rows].tolist()))
        saved_rows = zip(sequences.sequences[b].tolist(), sequences.attention_masks[b].tolist(), columns["rewards"][b])
        assert sorted(saved_rows) == trl_rows
    assert sequences.prompt_lens == [batch["prompt_ids"].shape[1]] * len(PROMPTS)


# ---- the probe's replay of that batch is TRL's step ----


def test_grad_loss_is_trls_gradient(recorded, replayed):
    _, vectors = replayed
    assert relative_error(vectors["grad_loss"], recorded.gradient) <= REL_TOL
    assert cosine(vectors["grad_loss"], recorded.gradient) >= COS_TOL


def test_update_is_the_float64_adamw_step_of_trls_gradient(recorded, replayed):
    _, vectors = replayed
    step = adamw_step(recorded, recorded.gradient)
    assert relative_error(vectors["update"], step) <= REL_TOL
    assert cosine(vectors["update"], step) >= COS_TOL


def test_checkpoint_difference_is_the_update_up_to_float32_rounding(recorded, replayed):
    """θ_{N+1} − θ_N is fl32(θ + Δθ) − θ, not Δθ: each write of θ rounds to θ's float32 spacing."""
    _, vectors = replayed
    update = vectors["update"]
    before, after = checkpoint_weights(recorded.checkpoint), checkpoint_weights(recorded.next_checkpoint)
    real = {key: after[key].double() - before[key].double() for key in update}

    assert relative_error(real, update) <= step_tolerance(recorded, update)
    assert cosine(real, update) >= STEP_COS_TOL


def test_next_checkpoint_report_says_the_predicted_step_is_the_real_one(recorded, replayed):
    results, vectors = replayed
    (probe,) = results["probes"]
    report = probe["next_checkpoint"]
    assert report["steps"] == 1
    assert report["cosine"] >= STEP_COS_TOL
    assert report["norm_ratio"] == pytest.approx(1.0, abs=step_tolerance(recorded, vectors["update"]))


# ---- what a trainer batch must be ----


def two_prompts_batch(completion_mask: list[list[int]]) -> TrainerBatch:
    """Two prompts (one left-padded) × G = 2 completions of width 3."""
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [7, 8, 9]])
    return TrainerBatch(
        prompt_ids=prompt_ids,
        prompt_mask=(prompt_ids != 0).long(),
        completion_ids=torch.tensor([[1, 2, 3]] * 4),
        completion_mask=torch.tensor(completion_mask),
        rewards=torch.tensor([0.0, 1.0, 1.0, 0.0]),
        prompts=["five six", "seven eight nine", "five six", "seven eight nine"],
    )


def test_rows_of_a_prompt_are_grouped_by_its_tokens_not_their_positions():
    batch = two_prompts_batch([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    assert prompt_groups(batch, G=2) == [[0, 2], [1, 3]]


def test_a_prompt_whose_completions_are_not_a_multiple_of_g_is_refused():
    batch = two_prompts_batch([[1, 1, 1]] * 4)
    with pytest.raises(ProbeConfigError, match=r"prompt 'five six' has 2 completions, not a multiple of G=4"):
        prompt_groups(batch, G=4)


def test_a_completion_mask_with_holes_is_refused():
    with pytest.raises(ProbeConfigError, match="completion_mask has a 1 after a 0"):
        two_prompts_batch([[1, 0, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
