"""Sequential sampling (data.target_rse): a probe draws more E and U prompts until SE / |δH₁| <= the target.

After each stage the probe has δH₁, its SE and the SE's E and U parts; the next stage's sizes are those
estimators.sizes_for_target calls for (where a second buys the most variance), never fewer than drawn, at most
GROWTH times the prompts drawn so far (a stage's SE is itself an estimate: a δH₁ near 0 would ask for
thousands), and within max_prompts. docs/math.md "Sequential sampling" says what stopping does to the estimate.
"""

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from probe_lightning.estimators import sizes_for_target

if TYPE_CHECKING:  # results.py imports the data side, which imports this
    from probe_lightning.results import ProbeResult

GROWTH = 4


@dataclass
class SequentialSampling:
    target_rse: float
    max_prompts: int  # E + U prompts of one probe, at most
    stages: list[dict] = field(default_factory=list)  # this probe's: sizes, δH₁ and SE after each

    def more(self, result: "ProbeResult") -> dict[str, int] | None:
        """The E and U prompts to draw next after a stage ending in `result`, or None to stop (the reason is the
        last stage's "stop")."""
        sizes = {"E": result.B_E, "U": result.B_U}
        stage = {"B_E": result.B_E, "B_U": result.B_U, "delta_h1": result.delta_h1, "delta_h1_se": result.delta_h1_se}
        self.stages.append(stage)
        se = result.delta_h1_se
        if se is not None and math.isfinite(se) and se <= self.target_rse * abs(result.delta_h1):
            stage["stop"] = "target reached"
            return None
        drawn = sum(sizes.values())
        room = min(self.max_prompts, GROWTH * drawn) - drawn
        if room <= 0:
            stage["stop"] = "max_prompts reached"
            return None
        needed = sizes_for_target(
            result.delta_h1, result.delta_h1_se_parts or {}, sizes, result.seconds_per_prompt or {}, self.target_rse
        )
        if needed is None:  # δH₁ = 0 or a side of one prompt: grow both sides alike
            wanted = {role: size for role, size in sizes.items()}
        else:
            wanted = {role: max(0, needed[f"B_{role}"] - size) for role, size in sizes.items()}
        total = sum(wanted.values())
        if total > room:  # within the room, in the same proportion
            wanted = {role: math.floor(n * room / total) for role, n in wanted.items()}
        if sum(wanted.values()) == 0:
            wanted = {"E": 1, "U": 1} if room >= 2 else {"E": 0, "U": 0}
        if sum(wanted.values()) == 0:
            stage["stop"] = "max_prompts reached"
            return None
        return wanted

    def record(self) -> dict:
        """What the probe drew and why it stopped, for results.json; and a fresh start for the next probe."""
        record = {"target_rse": self.target_rse, "max_prompts": self.max_prompts, "stages": self.stages,
                  "stopped": self.stages[-1].get("stop")}  # fmt: skip
        self.stages = []
        return record
