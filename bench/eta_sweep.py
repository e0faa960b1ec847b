"""The η sweep on the default model: the true entropy change of the real step against δH₁ and the
covariance proxy, without an optimizer state (the default config: identity geometry) and with a real one.

    python bench/eta_sweep.py                      # both tables, B_V = 32 (~15 min on 2 CPU cores)
    python bench/eta_sweep.py --B_V 16 --skip_adam true
    python bench/eta_sweep.py --skip_identity true --target_rse 0.33 --max_prompts 192 --B_V 64
        # the Adam table at sizes that resolve δH₁ (issue 21 item 4): B_E = 80, B_U = 93 here, ~45 min in all

The Adam state is real: a checkpoint-3/ of the HF Trainer after 3 AdamW steps (lr 1e-5, constant) of
language-model loss on the arithmetic task's prompts with their answers, written into a temporary folder.
The probe then takes the exact AdamW step (with the trainer's clipping) at each η, at the identity table's
batch shape (G = 4, 64 new tokens).
Writes bench/results/eta_sweep.json and prints each table.
"""

import json
import tempfile
from pathlib import Path

import torch
from jsonargparse import CLI
from transformers import Trainer, TrainingArguments

import train
from probe_lightning.data import format_prompt
from probe_lightning.models import DEFAULT_MODEL, load_model_and_tokenizer
from probe_lightning.problems import arithmetic_problems

ROOT = Path(__file__).parents[1]
COLUMNS = ("eta", "delta_h1", "delta_h_true", "delta_h_true_se", "ess", "ratio", "covariance_proxy")


def adam_checkpoint(folder: Path) -> str:
    """checkpoint-3/ of a real HF Trainer run on the default model (full fine-tuning, AdamW)."""
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    texts = [format_prompt(tokenizer, p.question) + f"<answer>{p.answer}</answer>" for p in arithmetic_problems(1)[:12]]
    encoded = [tokenizer(text, return_tensors="pt").input_ids[0] for text in texts]
    dataset = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)} for ids in encoded]
    args = TrainingArguments(
        output_dir=str(folder), max_steps=3, save_steps=3, per_device_train_batch_size=1, learning_rate=1e-5,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=dataset).train()
    return str(folder / "checkpoint-3")


def sweep(extra: list[str], etas: list[float], B_V: int, save_dir: str, target_rse: float | None = None,
          max_prompts: int = 512, breakdown: bool = False) -> dict:  # fmt: skip
    sequential = ["--data.target_rse", str(target_rse), "--data.max_prompts", str(max_prompts)] if target_rse else []
    # The breakdown's SEs and entropy_coef_for_zero are not this bench's subject, and cost passes of their own.
    extras = [
        arg for flag in ("breakdown_se", "entropy_coef_for_zero") for arg in (f"--model.{flag}", str(breakdown).lower())
    ]
    train.main(
        ["predict", "--config", str(ROOT / "configs/sp.yaml"), "--model.eta_sweep", json.dumps(etas),
         "--data.B_V", str(B_V), "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", save_dir, *sequential, *extras, *extra]
    )  # fmt: skip
    (path,) = Path(save_dir).glob("**/results.json")
    results = json.loads(path.read_text())
    keep = ("update", "learning_rate", "delta_h1", "delta_h1_se", "resolved", "B_E", "B_U", "sequential",
            "sizes_for_target", "clip_factor", "eta_sweep", "eta_sweep_summary", "timings", "trainer")  # fmt: skip
    return {key: results.get(key) for key in keep}


def table(name: str, results: dict) -> str:
    lines = [f"{name}: update {results['update']}, η₀ {results['learning_rate']:.3g}", "  ".join(COLUMNS)]
    for row in results["eta_sweep"]:
        # results.json writes NaN as null
        lines.append("  ".join("—" if row[c] is None else f"{row[c]:.4g}" for c in COLUMNS))
    lines.append(json.dumps(results["eta_sweep_summary"]))
    lines.append(f"eta_sweep seconds {results['timings']['eta_sweep']:.1f} of {sum(results['timings'].values()):.1f}")
    return "\n".join(lines)


def main(
    B_V: int = 32,
    etas: list[float] = [0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],  # noqa: B006 (jsonargparse reads the default)
    adam_etas: list[float] = [0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3],  # noqa: B006
    skip_adam: bool = False,
    skip_identity: bool = False,
    target_rse: float | None = None,
    max_prompts: int = 512,
    breakdown: bool = False,
    output: str | None = None,
):
    """
    Args:
        B_V: evaluation prompts (G_E responses each) where the true change is measured.
        etas: the sweep of the adam-free (identity geometry) probe.
        adam_etas: the sweep with the real Adam state (exact AdamW step).
        skip_adam: only the adam-free table.
        skip_identity: only the table with the real Adam state.
        target_rse: sequential sampling (data.target_rse): B_E and B_U grow until SE(δH₁) <= target_rse |δH₁|;
            the true change's SE is B_V's to bring down.
        max_prompts: with target_rse, the most E + U prompts.
        breakdown: also the breakdown's SEs and entropy_coef_for_zero (model.breakdown_se, model.entropy_coef_for_zero):
            passes of their own that this bench does not read.
        output: the JSON's path (default bench/results/eta_sweep.json).
    """
    report = {}
    path = Path(output or ROOT / "bench/results/eta_sweep.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        if not skip_identity:
            report["identity"] = sweep([], etas, B_V, folder + "/identity", target_rse, max_prompts, breakdown)
            path.write_text(json.dumps(report, indent=2))  # each table as soon as it is measured
            print(table("no optimizer state", report["identity"]), flush=True)
        if not skip_adam:
            checkpoint = adam_checkpoint(Path(folder) / "trainer")
            # The checkpoint is an LM-loss Trainer's, whose training_args.bin has no GRPO batch shape: without these
            # the probe would take TRL's defaults (G = 8, 512 new tokens), 8x the identity table's cost per prompt.
            shape = ["--model.G", "4", "--model.generation.max_new_tokens", "64"]
            report["adamw_step"] = sweep(
                ["--model.checkpoint", checkpoint, *shape],
                adam_etas,
                B_V,
                folder + "/adamw",
                target_rse,
                max_prompts,
                breakdown,
            )
            path.write_text(json.dumps(report, indent=2))
            print(table("real Adam state", report["adamw_step"]), flush=True)


if __name__ == "__main__":
    CLI(main, as_positional=False)
