"""DeltaH1Logger: per-probe δH₁ and its ingredients to every Lightning logger, and results.json."""

import json
import math
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

# results.json's top level carries these per-probe numbers averaged over the probes.
_AVERAGED = ("delta_h1", "bars_dot", "x_norm", "y_norm", "B_E", "B_U", "reward_mean", "entropy_mean")


def results_path(trainer: pl.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir) / "results.json"


def summarise(results: dict) -> dict:
    """Add the across-probe mean (top level) and its standard error to the results dict."""
    probes = results["probes"]
    if not probes:
        return results
    summary = {key: sum(p[key] for p in probes) / len(probes) for key in _AVERAGED}
    if all(p["delta_h1_se"] is not None for p in probes):  # plug-in SE of the mean of independent probes
        summary["delta_h1_se"] = math.sqrt(sum(p["delta_h1_se"] ** 2 for p in probes)) / len(probes)
    values = [p["delta_h1"] for p in probes]
    if len(values) > 1:
        mean = summary["delta_h1"]
        variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        summary["delta_h1_mean_se"] = math.sqrt(variance / len(values))
    return {**results, **summary, "num_probes": len(probes)}


@rank_zero_only
def _write(path: Path, payload: dict) -> None:
    """A reader (or a crash) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


class DeltaH1Logger(pl.Callback):
    """Logs each finished probe and rewrites results.json, so finished probes survive a crash."""

    def __init__(self):
        self._logged_probes = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        rollout = outputs.rollout
        batch_metrics = {
            f"batch/{rollout.role}/reward_mean": rollout.rewards.mean().item(),
            f"batch/{rollout.role}/entropy_mean": (
                outputs.token_entropies.sum() / rollout.batch.response_mask.sum().clamp(min=1)
            ).item(),
        }
        for logger in trainer.loggers:
            logger.log_metrics(batch_metrics, step=batch_idx)
        if len(pl_module.results) > self._logged_probes:
            self._log_new_probes(trainer, pl_module)

    def _log_new_probes(self, trainer, pl_module) -> None:
        info = pl_module.info
        for result in pl_module.results[self._logged_probes :]:
            metrics = {
                f"probe/{key}": value
                for key, value in vars(result).items()
                if key != "probe_index" and isinstance(value, (int, float))
            }
            metrics.update({"probe/learning_rate": info.learning_rate, "probe/G": info.G, "probe/G_E": info.G_E})
            metrics.update({f"timing/{phase}": seconds for phase, seconds in info.timings.items()})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=result.probe_index)
        self._logged_probes = len(pl_module.results)
        _write(results_path(trainer), summarise(pl_module.results_dict()))

    def on_predict_end(self, trainer, pl_module):
        results = summarise(pl_module.results_dict())
        _write(results_path(trainer), results)
        for logger in trainer.loggers:
            logger.save()
        if "delta_h1" in results:
            spread = f" ± {results['delta_h1_mean_se']:.4g} (SE over {results['num_probes']} probes)" if (
                "delta_h1_mean_se" in results
            ) else ""
            rank_zero_info(
                f"δH₁ = {results['delta_h1']:.6g}{spread}  (η = {results['learning_rate']:.3g}, "
                f"⟨X̄,Ȳ⟩ = {results['bars_dot']:.6g}, preconditioner: {results['preconditioner']})"
            )
        rank_zero_info(f"results: {results_path(trainer)}")
