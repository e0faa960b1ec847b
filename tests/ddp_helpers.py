"""A callback for the multi-process tests, importable by the processes `train.py` starts (PYTHONPATH=tests)."""

import lightning.pytorch as pl


class FailOnRank(pl.Callback):
    """A rollout check that raises on one rank in one probe: an error inside the probe's work, mid-probe."""

    def __init__(self, rank: int = 1, probe: int = 1):
        self.rank, self.probe = rank, probe

    def setup(self, trainer, pl_module, stage):
        self.trainer = trainer
        pl_module.add_rollout_check(self)

    def check_rollout(self, rollout, G):
        if self.trainer.global_rank == self.rank and rollout.prompts.probe_index == self.probe:
            raise RuntimeError(f"injected failure on rank {self.rank} in probe {self.probe}")

    def check_scores(self, rollout, scores):
        pass
