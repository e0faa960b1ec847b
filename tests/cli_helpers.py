"""Helpers shared by the tests that run the probe's command line or its Lightning plumbing."""

from pathlib import Path

import lightning.pytorch as pl

from probe_lightning.data import ProbeDataModule
from probe_lightning.module import EntropyProbe
from probe_lightning.sampling import GenerationConfig

ROOT = Path(__file__).parents[1]


def cli_args(world, prompts_file, tmp_path, config="configs/sp.yaml", *extra) -> list[str]:
    """train.py predict on the world model: 3 new tokens, 4 E and 4 U prompts, a CSV logger in tmp_path."""
    return [
        "predict", "--config", str(ROOT / config),
        "--model.model", world, "--model.generation.max_new_tokens", "3", "--model.generation.stop_strings", "[]",
        "--data.source", "jsonl", "--data.path", prompts_file, "--data.B_E", "4", "--data.B_U", "4",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def results_file(tmp_path: Path) -> Path:
    """The one results.json a run wrote under tmp_path."""
    (path,) = tmp_path.glob("**/results.json")
    return path


class CrashAtProbe(pl.Callback):
    """Fails the run when probe `probe_index` starts, as a crash would."""

    def __init__(self, probe_index):
        self.probe_index = probe_index

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch.probe_index == self.probe_index:
            raise RuntimeError("simulated crash")


def probe_and_data(world, prompts_file, num_probes):
    """An EntropyProbe on the world model and a DataModule of 3 E and 3 U prompts per probe."""
    probe = EntropyProbe(model=world, G=4, learning_rate=1.0, generation=GenerationConfig(max_new_tokens=3))
    data = ProbeDataModule(source="jsonl", path=prompts_file, B_E=3, B_U=3, num_probes=num_probes)
    return probe, data
