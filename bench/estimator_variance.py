"""The standard error of δH₁ with the rb estimator against naive, on the same samples, and what each costs.

    python bench/estimator_variance.py                       # configs/sp.yaml, 4 probes of B_E = B_U = 8
    python bench/estimator_variance.py --num_probes 8 --B 16

Each estimator runs `train.py predict` on the config with the same seed, so both see the very same
prompts and sampled responses (paired); only X's estimator differs. Reported per estimator: the plug-in
SE of δH₁ per probe (its E part, Var(a_e)/B_E, is what the estimator changes; the U part is shared), the
spread of δH₁ over the probes, and the seconds of the X pass and of the standard-error pass.
Writes bench/results/estimator_variance.json and prints it.
"""

import json
import math
import tempfile
from pathlib import Path

from jsonargparse import CLI

import train

ROOT = Path(__file__).parents[1]


def run(config: str, estimator: str, num_probes: int, B: int, save_dir: str) -> dict:
    train.main(
        ["predict", "--config", config, "--model.estimator", estimator, "--data.num_probes", str(num_probes),
         "--data.B_E", str(B), "--data.B_U", str(B), "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", save_dir]
    )  # fmt: skip
    (path,) = Path(save_dir).glob("**/results.json")
    return json.loads(path.read_text())


def summary(results: dict) -> dict:
    probes = results["probes"]
    values = [p["delta_h1"] for p in probes]
    mean = sum(values) / len(values)
    return {
        "delta_h1": values,
        "delta_h1_se": [p["delta_h1_se"] for p in probes],
        "se_entropy_part": [p["delta_h1_se_parts"]["E"] for p in probes],
        "mean_se_squared": sum(p["delta_h1_se"] ** 2 for p in probes) / len(probes),
        "mean_entropy_part_squared": sum(p["delta_h1_se_parts"]["E"] ** 2 for p in probes) / len(probes),
        "spread_over_probes": math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)),
        "seconds_per_probe": {k: v / len(probes) for k, v in results["timings"].items()},
    }


def main(config: str = str(ROOT / "configs/sp.yaml"), num_probes: int = 4, B: int = 8, output: str | None = None):
    """
    Args:
        config: the LightningCLI config to probe with.
        num_probes: independent (E, U) draws per estimator.
        B: B_E = B_U.
        output: where to write the JSON (default bench/results/estimator_variance.json).
    """
    report = {"config": config, "num_probes": num_probes, "B": B}
    for estimator in ("rb", "naive"):
        with tempfile.TemporaryDirectory() as save_dir:
            report[estimator] = summary(run(config, estimator, num_probes, B, save_dir))
    assert report["rb"]["delta_h1"] != report["naive"]["delta_h1"]
    report["variance_ratio_rb_over_naive"] = report["rb"]["mean_se_squared"] / report["naive"]["mean_se_squared"]
    report["entropy_part_variance_ratio_rb_over_naive"] = (
        report["rb"]["mean_entropy_part_squared"] / report["naive"]["mean_entropy_part_squared"]
    )
    report["x_pass_time_ratio_rb_over_naive"] = (
        report["rb"]["seconds_per_probe"]["teacher_force_x"] / report["naive"]["seconds_per_probe"]["teacher_force_x"]
    )
    path = Path(output or ROOT / "bench/results/estimator_variance.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    CLI(main, as_positional=False)
