"""The entropy probe inside a TRL GRPO run, every step: does δH₁ track the realized change (docs/in_training.md)?

For each --mode (full fine-tuning, PEFT LoRA), a trl.GRPOTrainer run of SmolLM2-135M-Instruct on the built-in
arithmetic task, rewarded by probe_lightning.rewards.AnswerMatch, CPU, --steps steps, with
EntropyProbeCallback(every_n_steps=1): each step's δH₁ ± SE, the true change ΔH_true = H(θ′) − H(θ) ± SE on a V
batch, and the covariance proxy. Per mode it reports the ratio ΔH_true/δH₁ (median, IQR), the correlations over
steps of δH₁ and of the proxy with ΔH_true, the share of steps whose true change is resolved (|ΔH_true| ≥ 2 SE),
and the probe's time per step against the trainer's own.

    python bench/in_training.py                                   # both modes, 20 steps each
    python bench/in_training.py --mode lora --steps 50 --B-V 64 --budget-minutes 90
    python bench/in_training.py --steps 2 --prompts 2 --num-generations 2 --max-completion-length 16 \\
        --B-E 2 --G-E 2 --B-V 2 --mode full                       # smoke run

Writes bench/results/in_training.json (--output) and, per mode, under bench/results/in_training/<mode>/: the
callback's probes.parquet and predicted_vs_realized.png, and scatter.png (δH₁ and the proxy against ΔH_true).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import trl
from matplotlib.figure import Figure
from peft import LoraConfig
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parents[1]))

from probe_lightning.integrations.trl import EntropyProbeCallback  # noqa: E402
from probe_lightning.models import DEFAULT_MODEL, load_tokenizer, resolve_model_path  # noqa: E402
from probe_lightning.problems import arithmetic_problems  # noqa: E402
from probe_lightning.rewards import AnswerMatch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = ("full", "lora")
RESOLVED_Z = 2.0  # a step's true change is resolved when |ΔH_true| ≥ 2 SE
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class StepClock(TrainerCallback):
    """Each optimizer step's wall time, on_step_begin to on_step_end (generation, loss, backward, the optimizer
    step and the probe's hooks), keyed by global_step before the step (the probe row's "step"); and the stop
    (control.should_training_stop) once the run has taken budget_seconds."""

    def __init__(self, budget_seconds: float):
        self.budget_seconds = budget_seconds
        self.step_seconds: dict[int, float] = {}
        self.stopped_by_budget = False
        self._train_start = self._step_start = 0.0
        self._step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._train_start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step, self._step_start = state.global_step, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds[self._step] = now - self._step_start
        if now - self._train_start >= self.budget_seconds and state.global_step < state.max_steps:
            control.should_training_stop = self.stopped_by_budget = True


def train_with_probe(args, mode: str, folder: Path) -> dict:
    """One GRPO run of --steps steps with the probe every step; its rows, step times and settings."""
    problems = arithmetic_problems(seed=1)  # the trainer's prompts and the probe's E and V pool (1996 rows)
    dataset = datasets.Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    learning_rate = args.lr_full if mode == "full" else args.lr_lora
    config = trl.GRPOConfig(
        output_dir=str(folder / "run"), report_to="none", use_cpu=True, bf16=False, disable_tqdm=True,
        per_device_train_batch_size=args.prompts * args.num_generations, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length, temperature=1.0,
        top_p=1.0, learning_rate=learning_rate, lr_scheduler_type="constant", max_steps=args.steps,
        save_strategy="no", seed=args.seed, logging_steps=1,
    )  # fmt: skip
    lora = None
    if mode == "lora":
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=LORA_TARGETS, lora_dropout=0.0,
                          task_type="CAUSAL_LM")  # fmt: skip
    probe = EntropyProbeCallback(
        every_n_steps=1, B_E=args.B_E, G_E=args.G_E, B_V=args.B_V, seed=args.seed, output_dir=str(folder)
    )
    clock = StepClock(60 * args.budget_minutes)
    start = time.perf_counter()
    trainer = trl.GRPOTrainer(
        model=resolve_model_path(DEFAULT_MODEL), reward_funcs=AnswerMatch(), args=config, train_dataset=dataset,
        processing_class=load_tokenizer(DEFAULT_MODEL), callbacks=[clock, probe], peft_config=lora,
    )  # fmt: skip
    setup_seconds = time.perf_counter() - start
    trainer.train()
    train_seconds = time.perf_counter() - start - setup_seconds
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    steps = []
    for row in probe.rows:
        probe_seconds = row["probe_seconds"]
        step_seconds = clock.step_seconds.get(row["step"], math.nan)
        steps.append({
            key: row.get(key, math.nan) for key in ("step", "delta_h1", "delta_h1_se", "delta_h_true",
                                                    "delta_h_true_se", "ess", "covariance_proxy", "x_norm",
                                                    "step_norm", "entropy_mean", "learning_rate")
        } | {"probe_seconds": probe_seconds, "trainer_seconds": step_seconds - probe_seconds})  # fmt: skip
    logged = trainer.state.log_history
    return {
        "learning_rate": learning_rate,
        "trainable_parameters": trainable,
        "lora": None if lora is None else {"r": args.lora_r, "alpha": 2 * args.lora_r, "targets": LORA_TARGETS},
        "probe_disabled": probe.disabled,
        "steps_done": trainer.state.global_step,
        "stopped_by_budget": clock.stopped_by_budget,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "step_seconds": [clock.step_seconds[s] for s in sorted(clock.step_seconds)],
        "trl_step_time": [entry["step_time"] for entry in logged if "step_time" in entry],  # TRL's own, a check
        "reward_per_step": [entry["reward"] for entry in logged if "reward" in entry],
        "steps": steps,
    }


def quartiles(values: np.ndarray) -> dict:
    """Median and interquartile range of the finite values; None where there are none."""
    values = values[np.isfinite(values)]
    if not len(values):
        return {"n": 0, "median": None, "q25": None, "q75": None, "iqr": None}
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {"n": len(values), "median": median, "q25": q25, "q75": q75, "iqr": q75 - q25}


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r over the steps where both are finite; None with fewer than 3 such steps or a constant series."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def summarize(run: dict, planned_steps: int) -> dict:
    """The per-mode numbers of the report, from the run's per-step rows."""
    column = {key: np.array([s[key] for s in run["steps"]], dtype=float) for key in run["steps"][0]}
    true, true_se, delta_h1 = column["delta_h_true"], column["delta_h_true_se"], column["delta_h1"]
    # A step whose Δθ is 0 (every group of the trainer's batch had equal rewards: no advantage) changes nothing:
    # its 0 ≥ 2 × 0 is not a resolved change, and its ratio 0/0 is left out.
    resolved = (np.abs(true) >= RESOLVED_Z * true_se) & (true != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio, ratio_proxy, z_true = true / delta_h1, true / column["covariance_proxy"], np.abs(true) / true_se
    probe_seconds, trainer_seconds = column["probe_seconds"], column["trainer_seconds"]
    mean_step = float(np.mean(run["step_seconds"]))
    return {
        "steps_done": run["steps_done"],
        "probed_steps": len(run["steps"]),
        "moving_steps": int((column["step_norm"] > 0).sum()),  # the others had no advantage in their batch
        "resolved_fraction": float(resolved.mean()),
        "ratio_true_over_delta_h1": {"resolved": quartiles(ratio[resolved]), "all": quartiles(ratio)},
        "ratio_true_over_covariance_proxy": {"all": quartiles(ratio_proxy)},
        "pearson": {
            "delta_h1_vs_true": pearson(delta_h1, true),
            "covariance_proxy_vs_true": pearson(column["covariance_proxy"], true),
        },
        "standard_errors": {  # medians over the probed steps: what a step of this size resolves
            "delta_h1_se": float(np.nanmedian(column["delta_h1_se"])),
            "delta_h_true_se": float(np.nanmedian(true_se)),
            "abs_delta_h_true": float(np.nanmedian(np.abs(true))),
            "z_true": quartiles(z_true)["median"],
            "ess": float(np.nanmedian(column["ess"])),
        },
        "cost": {
            "probe_seconds_per_step": float(np.median(probe_seconds)),
            "trainer_seconds_per_step": float(np.median(trainer_seconds)),
            "probe_over_trainer_median": float(np.median(probe_seconds / trainer_seconds)),
            "probe_over_trainer_total": float(probe_seconds.sum() / trainer_seconds.sum()),
        },
        "projected_minutes_for_all_steps": (run["setup_seconds"] + mean_step * planned_steps) / 60,
    }


def scatter(run: dict, mode: str, path: Path) -> None:
    """δH₁ and the covariance proxy against ΔH_true, one point per step (± SE where there is one)."""
    steps = run["steps"]
    true = [s["delta_h_true"] for s in steps]
    figure = Figure(figsize=(10, 4.5))
    left, right = figure.subplots(1, 2)
    left.errorbar([s["delta_h1"] for s in steps], true, xerr=[s["delta_h1_se"] for s in steps],
                  yerr=[s["delta_h_true_se"] for s in steps], fmt="o", alpha=0.7)  # fmt: skip
    finite = [v for s in steps for v in (s["delta_h1"], s["delta_h_true"]) if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        left.plot([low, high], [low, high], color="grey", lw=0.8, ls="--", label="ΔH_true = δH₁")
        left.legend()
    left.set_xlabel("predicted δH₁ ± SE")
    right.scatter([s["covariance_proxy"] for s in steps], true, alpha=0.7)
    right.set_xlabel("covariance proxy −η Cov(log π, A)")
    for axes in (left, right):
        axes.axhline(0, color="grey", lw=0.5)
        axes.axvline(0, color="grey", lw=0.5)
        axes.set_ylabel("realized ΔH_true ± SE")
    figure.suptitle(f"{mode}: one point per step, token-mean entropy (nats)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def table(report: dict) -> str:
    """The printed summary: one line per mode (ratio = ΔH_true/δH₁ over resolved steps and over all; r = Pearson's
    r with ΔH_true over steps; cost = the probe's seconds per step over the trainer's own)."""

    def number(value, spec=".3g"):
        return "—" if value is None or not math.isfinite(value) else f"{value:{spec}}"

    def spread(stats):
        return "—" if stats["n"] == 0 else f"[{stats['q25']:.3g}, {stats['q75']:.3g}]"

    lines = []
    for mode, entry in report["modes"].items():
        s = entry["summary"]
        ratios, cost = s["ratio_true_over_delta_h1"], s["cost"]
        lines.append({
            "mode": mode, "lr": f"{entry['learning_rate']:.0e}", "steps": str(s["steps_done"]),
            "moving": str(s["moving_steps"]), "resolved": f"{s['resolved_fraction']:.0%}",
            "ratio (resolved)": number(ratios["resolved"]["median"]), "IQR (resolved)": spread(ratios["resolved"]),
            "ratio (all)": number(ratios["all"]["median"]), "IQR (all)": spread(ratios["all"]),
            "r(δH₁)": number(s["pearson"]["delta_h1_vs_true"], ".2f"),
            "r(proxy)": number(s["pearson"]["covariance_proxy_vs_true"], ".2f"),
            "probe s": f"{cost['probe_seconds_per_step']:.1f}", "trainer s": f"{cost['trainer_seconds_per_step']:.1f}",
            "cost": f"{cost['probe_over_trainer_median']:.2f}",
        })  # fmt: skip
    widths = {key: max(len(key), *(len(line[key]) for line in lines)) for key in lines[0]}
    rows = [{key: key for key in widths}, *lines]
    return "\n".join("  ".join(row[key].rjust(width) for key, width in widths.items()) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES), help="full, lora or both")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per mode, each probed")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per training step")
    parser.add_argument("--num-generations", type=int, default=4, help="the trainer's G")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--lr-full", type=float, default=1e-5, help="learning rate of full fine-tuning")
    parser.add_argument("--lr-lora", type=float, default=1e-4, help="learning rate of the LoRA adapters")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r, on q, k, v, o)")
    parser.add_argument("--B-E", dest="B_E", type=int, default=16, help="the probe's E prompts per step")
    parser.add_argument("--G-E", dest="G_E", type=int, default=4, help="responses per E prompt")
    parser.add_argument("--B-V", dest="B_V", type=int, default=32, help="V prompts (G_E responses each) per step")
    parser.add_argument("--budget-minutes", type=float, default=math.inf, help="stop each mode's run after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--folder", type=Path, default=RESULTS / "in_training")
    parser.add_argument("--output", type=Path, default=RESULTS / "in_training.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"settings": settings | {"model": DEFAULT_MODEL, "resolved_z": RESOLVED_Z}, "modes": {}}
    report["machine_load"] = {"start": os.getloadavg()}
    for mode in args.mode:
        folder = args.folder / mode
        run = train_with_probe(args, mode, folder)
        if not run["steps"]:
            raise RuntimeError(f"{mode}: the probe recorded no step (disabled: {run['probe_disabled']})")
        scatter(run, mode, folder / "scatter.png")
        report["modes"][mode] = run | {
            "summary": summarize(run, args.steps),
            "plots": {"predicted_vs_realized": str(folder / "predicted_vs_realized.png"),
                      "scatter": str(folder / "scatter.png")},  # fmt: skip
        }
        report["machine_load"]["end"] = os.getloadavg()
        args.output.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
