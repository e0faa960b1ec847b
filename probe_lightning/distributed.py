"""Several processes (Lightning DDP): sums all-reduced with SUM, per-sample scalars gathered, errors shared.

With one process every call is the identity. The probe splits each role's prompts across ranks
(data.py), so each rank's sums are partial until `sum_` (docs/math.md "Several processes").
"""

import torch
import torch.distributed as dist

from probe_lightning.config import require

# One process, or DDP's replicas: each rank holds the whole model, so its sums are whole-parameter sums
# that all-reduce exactly. Sharded strategies (FSDP, DeepSpeed, model parallel) would need shard-local
# sums (docs/scaling.md) and are refused. Exact class names: DeepSpeedStrategy subclasses DDPStrategy.
SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


def check_strategy(strategy) -> None:
    name = type(strategy).__name__
    require(
        name in SUPPORTED_STRATEGIES,
        f"trainer.strategy {name} cannot give the probe's answer (its sums need every parameter whole on each "
        f"process); supported: {', '.join(SUPPORTED_STRATEGIES)} (e.g. --trainer.strategy ddp)",
    )


class Collectives:
    def __init__(self, world_size: int = 1):
        self.world_size = world_size

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """In place: each tensor becomes its sum over the ranks."""
        if self.active:
            for tensor in tensors:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not self.active:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def raise_any(self, error: BaseException | None) -> None:
        """Where every rank meets: if one failed, all raise (each rank its own error, the others the
        failing rank's), so no rank waits forever in a collective the failed one never reaches."""
        failures = [(rank, message) for rank, message in enumerate(self.gather(_describe(error))) if message]
        if error is not None:
            raise error
        if failures:
            rank, message = failures[0]
            raise RuntimeError(f"rank {rank} failed: {message}")


def _describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"
