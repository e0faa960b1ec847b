"""Progress inside one predict step: its long phases (sampling, teacher forcing) take minutes on a CPU, while
Lightning's bar moves only between steps. A bar per phase, on rank 0 and a terminal only, gone when it ends."""

import time

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from tqdm.auto import tqdm


def phase_bar(desc: str, unit: str, total: int | None = None, iterable=None) -> tqdm:
    """A bar over `iterable` (or of `total` units) that disappears when done; silent on other ranks and when
    stderr is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=None if rank_zero_only.rank == 0 else True)  # fmt: skip


class SamplingProgress:
    """Sequences finished of those asked for, with the tokens per second drawn so far."""

    def __init__(self, total: int):
        self.bar = phase_bar("sampling", "seq", total)
        self.tokens, self.start = 0, time.perf_counter()

    def step(self, drawn: int, ended: int) -> None:
        """One decoding step: `drawn` tokens drawn, `ended` responses finished by them."""
        self.tokens += drawn
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{self.tokens / elapsed:.0f} tok/s" if elapsed > 0 else "", refresh=False)
        self.bar.update(ended)

    def close(self) -> None:
        self.bar.close()
