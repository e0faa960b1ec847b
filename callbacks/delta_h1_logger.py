"""DeltaH1Logger: per-probe δH₁ and its ingredients to every Lightning logger, and results.json."""

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from probe_lightning.probe import StepOutput
from probe_lightning.results import RunResults, write_json


def results_path(trainer: pl.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir) / "results.json"


class DeltaH1Logger(pl.Callback):
    """Logs each finished probe and rewrites results.json, so finished probes survive a crash."""

    def __init__(self):
        self.results: RunResults | None = None

    def on_predict_batch_end(self, trainer, pl_module, outputs: StepOutput, batch, batch_idx, dataloader_idx=0):
        rollout = outputs.rollout
        batch_metrics = {
            f"batch/{rollout.role}/reward_mean": rollout.rewards.mean().item(),
            f"batch/{rollout.role}/entropy_mean": (
                outputs.token_entropies.sum() / rollout.batch.response_mask.sum().clamp(min=1)
            ).item(),
        }
        for logger in trainer.loggers:
            logger.log_metrics(batch_metrics, step=batch_idx)
        self.results = outputs.results
        if outputs.finished is not None:
            self._log_probe(trainer, outputs)

    def _log_probe(self, trainer, outputs: StepOutput) -> None:
        result, info = outputs.finished, outputs.results.info
        metrics = {
            f"probe/{key}": value
            for key, value in vars(result).items()
            if key != "probe_index" and isinstance(value, (int, float))
        }
        metrics.update({"probe/learning_rate": info.learning_rate, "probe/G": info.G, "probe/G_E": info.G_E})
        metrics.update({f"timing/{phase}": seconds for phase, seconds in info.timings.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=result.probe_index)
        _write(results_path(trainer), outputs.results.to_dict())

    def on_predict_end(self, trainer, pl_module):
        if self.results is None:
            return
        results = self.results.to_dict()
        _write(results_path(trainer), results)
        for logger in trainer.loggers:
            logger.save()
        if "delta_h1" in results:
            spread = f" ± {results['delta_h1_mean_se']:.4g} (SE over {results['num_probes']} probes)" if (
                "delta_h1_mean_se" in results
            ) else ""
            rank_zero_info(
                f"δH₁ = {results['delta_h1']:.6g}{spread}  (η = {results['learning_rate']:.3g}, "
                f"⟨X̄,Ȳ⟩ = {results['bars_dot']:.6g}, update: {results['update']})"
            )
        rank_zero_info(f"results: {results_path(trainer)}")


@rank_zero_only
def _write(path: Path, payload: dict) -> None:
    write_json(path, payload)
