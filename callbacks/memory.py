"""MemoryMonitor: peak memory per phase (E batches, U batches); CUDA on GPU, resident set on CPU."""

import resource
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _CLEAR_REFS.exists():
        _CLEAR_REFS.write_text("5")  # Linux: resets VmHWM, the peak resident set size


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    # Elsewhere only the process-wide peak is known (bytes on macOS, KiB on Linux).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class MemoryMonitor(pl.Callback):
    """Records the peak of each phase into the run's results (RunInfo.memory) and every attached logger."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        _reset_peak(pl_module.device)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        kind = "cuda" if pl_module.device.type == "cuda" else "rss"
        key = f"peak_{kind}_mib_{batch.role}_batches"
        peak = _peak_mib(pl_module.device)
        if outputs is None:  # this process failed; the probe's end raises its error on every process
            return
        memory = outputs.results.info.memory
        memory[key] = max(memory.get(key, 0.0), peak)
        for logger in trainer.loggers:
            logger.log_metrics({f"memory/{key}": peak}, step=batch_idx)
