"""The probe's command line: `python train.py predict --config configs/sp.yaml` (LightningCLI)."""

import sys

from lightning.pytorch.cli import LightningCLI

from probe_lightning.config import ProbeConfigError
from probe_lightning.data import ProbeDataModule
from probe_lightning.module import EntropyProbe


class ProbeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The evaluation prompts of the true-change check are drawn when, and only when, there is a sweep.
        parser.link_arguments("model.eta_sweep", "data.evaluate", compute_fn=bool)


def main(args: list[str] | None = None) -> None:
    try:
        ProbeCLI(EntropyProbe, ProbeDataModule, args=args, save_config_kwargs={"overwrite": True})
    except ProbeConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
