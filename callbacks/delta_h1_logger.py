"""DeltaH1Logger: per-probe δH₁ and its ingredients to every Lightning logger, and results.json."""

from pathlib import Path

import datasets
import lightning.pytorch as pl
import matplotlib.pyplot as plt
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from probe_lightning.contributions import ProbeContributions
from probe_lightning.plots import block_shares_figure, counterfactual_figure, eta_sweep_figure
from probe_lightning.probe import ProbeVectors, StepOutput
from probe_lightning.report import write_report
from probe_lightning.results import (
    ENTROPY_COEF_FOR_ZERO,
    ProbeResult,
    RunResults,
    resolution,
    token_selections,
    write_json,
)
from probe_lightning.vectors import save_vectors


def results_path(trainer: pl.Trainer) -> Path:
    """Where results.json goes. trainer.log_dir is a collective under DDP: every process must ask, once."""
    return Path(trainer.log_dir or trainer.default_root_dir) / "results.json"


class DeltaH1Logger(pl.Callback):
    """Logs each finished probe and rewrites results.json, so finished probes survive a crash."""

    def __init__(self):
        self.results: RunResults | None = None
        self.path: Path | None = None  # results.json

    def on_predict_start(self, trainer, pl_module):
        self.path = results_path(trainer)
        pl_module.results_folder = self.path.parent

    def on_predict_batch_end(self, trainer, pl_module, outputs: StepOutput, batch, batch_idx, dataloader_idx=0):
        if outputs is None:  # this process failed; the probe's end raises its error on every process
            return
        rollout = outputs.rollout
        batch_metrics = {
            f"batch/{rollout.role}/reward_mean": rollout.rewards.nanmean().item(),  # NaN: unscored
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
        if result.eta_sweep:
            self._log_sweep(trainer, result)
        if outputs.contributions is not None:
            self._write_tables(trainer, outputs.contributions, result.counterfactuals)
        if outputs.vectors is not None:
            self._write_vectors(result.probe_index, outputs.vectors)
        if result.block_shares:
            self._write_block_figure(result)
        _write(self.path, outputs.results.to_dict())

    @rank_zero_only
    def _write_tables(self, trainer, contributions: ProbeContributions, counterfactuals: dict) -> None:
        """The probe's response and token rows as Parquet next to results.json (pandas, duckdb, datasets)."""
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        k = contributions.probe_index
        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a bar per table would interleave with the run's own output
        try:
            for name, rows in (("responses", contributions.responses), ("tokens", contributions.tokens)):
                datasets.Dataset.from_list(rows).to_parquet(str(folder / f"{name}_probe{k}.parquet"))
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        selections = token_selections(counterfactuals or {})
        if selections:
            figure = counterfactual_figure(selections, f"probe {k}: δH₁ of a step on selected tokens only")
            figure.savefig(folder / f"counterfactuals_probe{k}.png")
            plt.close(figure)

    @rank_zero_only
    def _write_vectors(self, k: int, vectors: ProbeVectors) -> None:
        path = self.path.with_name(f"vectors_probe{k}.safetensors")
        save_vectors(path, vectors.keys, vectors.x_bar, vectors.grad_loss, vectors.update)
        rank_zero_info(f"vectors: {path}")

    @rank_zero_only
    def _write_block_figure(self, result: ProbeResult) -> None:
        k = result.probe_index
        title = f"probe {k}: where in the network δH₁ comes from"
        figure = block_shares_figure(result.block_shares, title, result.block_shares_se)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.path.with_name(f"block_shares_probe{k}.png"))
        plt.close(figure)

    @rank_zero_only
    def _log_sweep(self, trainer, result: ProbeResult) -> None:
        """The η sweep: a PNG next to results.json, and the same numbers and figure in TensorBoard."""
        figure = eta_sweep_figure(result.eta_sweep, f"probe {result.probe_index}: true ΔH against predictions")
        path = self.path.with_name(f"eta_sweep_probe{result.probe_index}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        for logger in trainer.loggers:
            for row in result.eta_sweep:
                keys = ("delta_h1", "delta_h_true", "delta_h_true_se", "ess", "covariance_proxy")
                metrics = {f"eta_sweep/{key}/eta={row['eta']:g}": row[key] for key in keys}
                logger.log_metrics(metrics, step=result.probe_index)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("eta_sweep", figure, global_step=result.probe_index)
        plt.close(figure)

    def on_predict_end(self, trainer, pl_module):
        if self.results is None:
            return
        results = self.results.to_dict()
        _write(self.path, results)
        _report(results, self.path.parent)
        for logger in trainer.loggers:
            logger.save()
        if "delta_h1" in results:
            spread = ""
            if "delta_h1_mean_se" in results:
                spread = f" ± {results['delta_h1_mean_se']:.4g} (SE over {results['num_probes']} probes)"
            elif results.get("delta_h1_se") is not None:
                spread = f" ± {results['delta_h1_se']:.4g} (plug-in SE)"
            status = resolution(results, results["G"])
            status = f"; {status}" if status else ""
            empty = f"  [empty: {results['empty']}]" if "empty" in results else ""
            later = f"  [{results['later_steps']}]" if results.get("later_steps") else ""  # not predicted
            rank_zero_info(
                f"δH₁ = {results['delta_h1']:.6g}{spread} for the {results['entropy_target']} entropy  "
                f"(η = {results['learning_rate']:.3g}, ⟨X̄,Ȳ⟩ = {results['bars_dot']:.6g}, update: "
                f"{results['update']}, loss: {results['trainer']['loss_type']['value']}, "
                f"mixed U prompts: {results['mixed_update_fraction']:.0%}){status}{empty}{later}"
            )
        line = entropy_coef_line(results["probes"])
        if line:
            rank_zero_info(line)
        for probe in results["probes"]:
            if probe.get("next_checkpoint"):
                rank_zero_info(next_checkpoint_line(probe["probe_index"], probe["next_checkpoint"]))
        rank_zero_info(f"results: {self.path}")


def entropy_coef_line(probes: list[dict]) -> str | None:
    """The entropy_coef that holds the entropy steady, per probe, for the printed summary (None without one)."""
    parts = []
    for probe in probes:
        entry = (probe.get("counterfactuals") or {}).get(ENTROPY_COEF_FOR_ZERO)
        if entry is None:
            continue
        if not entry["exists"]:
            parts.append(f"probe {probe['probe_index']}: none >= 0 ({entry['note']})")
            continue
        se = f" ± {entry['se']:.2g}" if entry["se"] is not None else ""
        at = f"δH₁ = {entry['delta_h1_at_checkpoint_coef']:.4g} at the checkpoint's {entry['checkpoint_coef']:.4g}"
        if entry["checkpoint_coef"] != 0:
            at += f", {entry['delta_h1_at_zero_coef']:.4g} at 0"
        parts.append(f"probe {probe['probe_index']}: c* = {entry['value']:.4g}{se} ({at})")
    return "entropy_coef c* with δH₁(c*) = 0: " + "; ".join(parts) if parts else None


def next_checkpoint_line(k: int, nxt: dict) -> str:
    """The prediction beside the trainer's real step, side by side, for the printed summary."""
    along_se = nxt["delta_h_along_real_se"]
    along = f"{nxt['delta_h_along_real']:.4g}" + (f" ± {along_se:.2g}" if along_se is not None else "")
    line = (
        f"probe {k} vs {nxt['path']} (k = {nxt['steps']} step{'s' if nxt['steps'] > 1 else ''}): "
        f"δH₁ = {nxt['delta_h1']:.4g}, ⟨X̄, Δθ_real⟩ = {along}, true ΔH = {nxt['delta_h_true']:.4g} ± "
        f"{nxt['delta_h_true_se']:.2g} (ESS {nxt['ess']:.1f}), covariance proxy = {nxt['covariance_proxy']:.4g}; "
        f"cos(Δθ_pred, Δθ_real) = {nxt['cosine']:.6f}, ‖Δθ_pred‖/‖Δθ_real‖ = {nxt['norm_ratio']:.4g}"
    )
    return line + (f"  [{nxt['note']}]" if nxt.get("note") else "")


@rank_zero_only
def _write(path: Path, payload: dict) -> None:
    write_json(path, payload)


@rank_zero_only
def _report(results: dict, folder: Path) -> None:
    rank_zero_info(f"report: {write_report(results, folder)}")
