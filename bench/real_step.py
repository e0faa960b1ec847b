"""The probe beside a real TRL GRPO step on the default model (docs/real_step.md).

1. A TRL GRPOTrainer run of SmolLM2-135M-Instruct, full fine-tuning, on the built-in arithmetic task, rewarded
   by the probe's own answer match called as TRL calls a reward function (probe_lightning.rewards.AnswerMatch),
   N + 1 steps with save_steps=1. The generation batch of step N + 1 (its completions, masks and the rewards
   the trainer gave) is written as a U-only rollouts folder (probe_lightning.trainer_batch).
2. The probe on checkpoint-N with that batch replayed as U and --model.next_checkpoint checkpoint-N+1: δH₁,
   ⟨X̄, Δθ_real⟩, the true change H(θ′) − H(θ) on a V batch and the covariance proxy side by side, and
   cos(Δθ_pred, Δθ_real). B_E and B_V double until |ΔH_true| ≥ 3 SE or the time budget is spent.

    python bench/real_step.py                       # writes bench/results/real_step.json
    python bench/real_step.py --learning-rate 3e-5 --budget-minutes 60
"""

import argparse
import json
import sys
import time
from pathlib import Path

import datasets
import torch
import trl

sys.path.insert(0, str(Path(__file__).parents[1]))

import train  # noqa: E402
from probe_lightning.models import DEFAULT_MODEL, load_tokenizer, resolve_model_path  # noqa: E402
from probe_lightning.problems import arithmetic_problems  # noqa: E402
from probe_lightning.rewards import AnswerMatch  # noqa: E402
from probe_lightning.sampling import GenerationConfig  # noqa: E402
from probe_lightning.trainer_batch import TrainerBatch, save_trainer_batch  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def train_and_record(args, folder: Path) -> dict:
    """N + 1 GRPO steps; step N + 1's generation batch saved as rollouts. Returns the run's facts."""
    # The trainer's prompts: the built-in task in its own order; the probe draws E and V from the same task.
    problems = arithmetic_problems(seed=1)[: args.prompts * (args.steps + 1)]
    dataset = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p.question}], "answer": p.answer} for p in problems]
    )
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    config = trl.GRPOConfig(
        output_dir=str(folder / "run"), report_to="none", use_cpu=True, bf16=False, disable_tqdm=False,
        per_device_train_batch_size=args.prompts * args.G, gradient_accumulation_steps=1,
        num_generations=args.G, max_completion_length=args.max_completion_length, temperature=1.0, top_p=1.0,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", max_steps=args.steps + 1,
        save_strategy="steps", save_steps=1, seed=0, logging_steps=1,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=resolve_model_path(DEFAULT_MODEL), reward_funcs=AnswerMatch(), args=config, train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    recorded = {}
    generate_and_score, calculate_rewards = trainer._generate_and_score_completions, trainer._calculate_rewards

    def rewards_of(*call_args):  # the trainer's own rewards of each completion (one function, weight 1)
        per_function = calculate_rewards(*call_args)
        recorded["rewards"] = per_function[:, 0].clone()
        return per_function

    def recording(inputs):
        output = generate_and_score(inputs)
        if trainer.state.global_step == args.steps:
            recorded["batch"] = {k: v.detach().clone() for k, v in output.items() if isinstance(v, torch.Tensor)}
            recorded["inputs"] = inputs
            recorded["batch_rewards"] = recorded["rewards"]
        return output

    trainer._calculate_rewards, trainer._generate_and_score_completions = rewards_of, recording
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    batch, inputs = recorded["batch"], recorded["inputs"]
    checkpoint = folder / "run" / f"checkpoint-{args.steps}"
    save_trainer_batch(
        folder / "rollouts",
        TrainerBatch(
            batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"],
            recorded["batch_rewards"], [row["prompt"] for row in inputs], [{"answer": row["answer"]} for row in inputs],
        ),
        args.G, tokenizer, DEFAULT_MODEL, str(checkpoint),
        GenerationConfig(max_new_tokens=args.max_completion_length, temperature=1.0, top_p=1.0, stop_strings=[]),
    )  # fmt: skip
    logged = [row for row in trainer.state.log_history if "entropy" in row]
    return {
        "train_seconds": seconds,
        "steps": args.steps + 1,
        "recorded_step": args.steps + 1,
        "batch_reward_mean": recorded["batch_rewards"].mean().item(),
        "trl_entropy_per_step": [row["entropy"] for row in logged],
        "checkpoint": str(checkpoint),
        "next_checkpoint": str(folder / "run" / f"checkpoint-{args.steps + 1}"),
    }


def probe(args, folder: Path, run: dict, B_E: int, B_V: int) -> dict:
    """The probe on checkpoint-N with the recorded batch as U and checkpoint-N+1 beside it."""
    out = folder / f"probe_BE{B_E}_BV{B_V}"
    start = time.perf_counter()
    train.main([
        "predict", "--config", "configs/sp.yaml", "--model.model", DEFAULT_MODEL,
        "--model.checkpoint", run["checkpoint"], "--model.next_checkpoint", run["next_checkpoint"],
        "--data.rollouts", str(folder / "rollouts"), "--data.B_E", str(B_E), "--data.B_V", str(B_V),
        "--model.generation.stop_strings", "[]", "--model.generation.temperature", "1.0",
        "--model.generation.top_p", "1.0",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
    ])  # fmt: skip
    seconds = time.perf_counter() - start
    (path,) = out.glob("**/results.json")
    results = json.loads(path.read_text())
    nxt = results["probes"][0]["next_checkpoint"]
    true, se = nxt["delta_h_true"], nxt["delta_h_true_se"]
    return {
        "B_E": B_E, "B_V": B_V, "seconds": seconds, "results": str(path),
        "learning_rate": results["learning_rate"], "learning_rate_source": results["learning_rate_source"],
        "delta_h1": nxt["delta_h1"], "delta_h1_se": results["probes"][0]["delta_h1_se"],
        "delta_h_along_real": nxt["delta_h_along_real"], "delta_h_along_real_se": nxt["delta_h_along_real_se"],
        "delta_h_true": true, "delta_h_true_se": se, "ess": nxt["ess"], "z_true": abs(true) / se if se else 0.0,
        "covariance_proxy": nxt["covariance_proxy"], "cosine": nxt["cosine"], "norm_ratio": nxt["norm_ratio"],
        "least_aligned": nxt["least_aligned"],
        "closer_to_true": min(("delta_h1", "covariance_proxy"), key=lambda key: abs(nxt[key] - true)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="N: the probe runs on checkpoint-N")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per training step")
    parser.add_argument("--G", type=int, default=4, help="num_generations")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--B_E", type=int, default=16, help="E prompts of the first probe (doubled each round)")
    parser.add_argument("--B_V", type=int, default=64, help="V prompts of the first probe (doubled each round)")
    parser.add_argument("--budget-minutes", type=float, default=60.0, help="stop doubling after this long")
    parser.add_argument("--folder", type=Path, default=RESULTS / "real_step")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = train_and_record(args, args.folder)
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "training": run}
    attempts, B_E, B_V = [], args.B_E, args.B_V
    while True:
        attempts.append(probe(args, args.folder, run, B_E, B_V))
        report["attempts"] = attempts
        (RESULTS / "real_step.json").write_text(json.dumps(report, indent=2))
        elapsed = (time.perf_counter() - start) / 60
        if attempts[-1]["z_true"] >= 3 or elapsed + 2.5 * attempts[-1]["seconds"] / 60 > args.budget_minutes:
            break
        B_E, B_V = 2 * B_E, 2 * B_V
    report["resolved"] = attempts[-1]["z_true"] >= 3
    report["minutes"] = (time.perf_counter() - start) / 60
    (RESULTS / "real_step.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in attempts[-1].items() if k != "least_aligned"}, indent=2))


if __name__ == "__main__":
    main()
