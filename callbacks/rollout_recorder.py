"""RolloutRecorder: saves every rollout (data.save_rollouts) and refuses a replay (data.rollouts) whose
samples came from another model, checkpoint or sampling settings."""

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from callbacks.delta_h1_logger import results_path
from probe_lightning import rollout_store
from probe_lightning.probe import StepOutput


class RolloutRecorder(pl.Callback):
    """Writes rollouts/ beside results.json: identity.json at the start, each probe's rows when it ends, so
    only one probe's rows are held at a time."""

    def __init__(self):
        self.folder: Path | None = None  # set while recording
        self.rows: list[dict] = []  # the current probe's
        self.batch_index = 0  # of the current probe's rollout batches

    def on_predict_start(self, trainer, pl_module):
        data = trainer.datamodule
        if data is None:
            return
        if data.hparams.rollouts:
            rollout_store.check_replay(data.replay_identity, pl_module.sample_identity(), data.hparams.rollouts)
        if data.hparams.save_rollouts:
            self._start(trainer, pl_module, data)

    @rank_zero_only
    def _start(self, trainer, pl_module, data) -> None:
        hp = data.hparams
        keys = ("source", "path", "B_E", "B_U", "B_V", "evaluate", "num_probes", "seed", "reward_fn", "reward_weights")
        settings = {key: hp[key] for key in keys}
        settings["rollout_batch_size"] = data.batch_config.rollout_batch_size
        self.folder = results_path(trainer).with_name("rollouts")
        roles = ["E", "V", "U"] if hp.evaluate else ["E", "U"]
        rollout_store.write_identity(self.folder, pl_module.sample_identity() | {"roles": roles, "data": settings})

    def on_predict_batch_end(self, trainer, pl_module, outputs: StepOutput, batch, batch_idx, dataloader_idx=0):
        if self.folder is None:
            return
        self.rows += outputs.rollout.saved_rows(self.batch_index)
        self.batch_index += 1
        if batch.last_in_probe:
            rollout_store.save_probe(self.folder, batch.probe_index, self.rows)
            self.rows, self.batch_index = [], 0
