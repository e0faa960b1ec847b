"""The probe's command line: `python train.py predict --config configs/sp.yaml` (LightningCLI)."""

import sys

from lightning.pytorch.cli import LightningCLI

from probe_lightning.config import ProbeConfigError
from probe_lightning.data import ProbeDataModule
from probe_lightning.module import EntropyProbe


class ProbeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The evaluation prompts of the true change are drawn when, and only when, a sweep or a next checkpoint
        # asks for it.
        parser.link_arguments(
            ("model.eta_sweep", "model.next_checkpoint"), "data.evaluate", compute_fn=lambda sweep, nxt: bool(sweep or nxt)
        )


def main(args: list[str] | None = None) -> None:
    try:
        ProbeCLI(EntropyProbe, ProbeDataModule, args=args, save_config_kwargs={"overwrite": True})
    except ProbeConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
