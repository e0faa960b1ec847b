"""What a probe run reports: one record per probe, the run's settings, the summary, results.json.

The whole results.json schema lives here; callbacks write `RunResults.to_dict()` and nothing else.
"""

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from probe_lightning.estimators import resolved
from probe_lightning.trainer_loss import TrainerSettings
from probe_lightning.true_change import sweep_summary

# results.json's top level carries these per-probe numbers averaged over the probes.
_AVERAGED = (
    "delta_h1", "bars_dot", "x_norm", "y_norm", "B_E", "B_U", "reward_mean", "entropy_mean", "clip_factor",
    "mixed_update_fraction", "covariance",
)  # fmt: skip


@dataclass
class ProbeResult:
    """One probe's numbers."""

    probe_index: int
    delta_h1: float
    bars_dot: float  # ⟨X̄, Ȳ⟩
    x_norm: float
    y_norm: float
    B_E: int
    B_U: int
    reward_mean: float
    entropy_mean: float  # mean per-token entropy of q over all response tokens of the probe
    clip_factor: float = 1.0  # the trainer's gradient clipping: min(1, max_grad_norm / (‖∇J̄‖ + 1e-6))
    mixed_update_fraction: float = 1.0  # U prompts whose responses got different rewards (else all A = 0)
    delta_h1_se: float | None = None  # plug-in standard error (docs/math.md); None when not computed
    delta_h1_se_parts: dict[str, float] | None = None  # its E and U terms: sqrt of each variance term
    resolved: bool | None = None  # |δH₁| >= 2 SE: its sign is known (None without the SE)
    # The cheapest B_E and B_U at this G whose SE would be |δH₁| / 3, from the variance parts and the measured
    # seconds per prompt of each side: {target_rse, B_E, B_U, seconds} (estimators.sizes_for_target)
    sizes_for_target: dict | None = None
    seconds_per_prompt: dict[str, float] | None = None  # wall seconds per E and per U prompt in this probe
    # data.target_rse: the stages drawn (sizes, δH₁, SE after each) and why the probe stopped (sequential.py)
    sequential: dict | None = None
    # Cov(log π(y_t), A(y_t)) over the U batch's tokens: Cui et al.'s proxy predicts ΔH ≈ −η · covariance
    covariance: float | None = None
    eta_sweep: list[dict] | None = None  # per η: δH₁(η), the true ΔH with SE and ESS, ratio, covariance proxy
    eta_sweep_summary: dict | None = None  # noise floor, linear-regime limit, log-log slope
    # η b_u / B_U per update prompt and η a_e / B_E per entropy prompt, keyed by prompt id: each set adds
    # up to delta_h1 (to the linearised step with adamw_step: contributions_add_up_to says which)
    update_prompt_contributions: dict[int, float] | None = None
    entropy_prompt_contributions: dict[int, float] | None = None
    contributions_add_up_to: str | None = None
    top_responses: list[dict] | None = None  # the 10 responses with the largest |contribution|, with tokens
    top_tokens: list[dict] | None = None  # the 10 U tokens with the largest |contribution|
    # δH₁ of the step trained only on token selections ({delta_h1, tokens, fraction, se, se_parts, removed_delta_h1,
    # removed_se} by name), and
    # ENTROPY_COEF_FOR_ZERO: the entropy_coef c* whose step leaves the entropy unchanged (entropy_coef.py)
    counterfactuals: dict[str, dict] | None = None
    # ⟨X̄_k, Δθ_k⟩ per parameter tensor (by its checkpoint key) and summed per block (embeddings, each decoder
    # layer, final norm, output head): where in the network δH₁ comes from; each set adds up to delta_h1
    parameter_shares: dict[str, float] | None = None
    block_shares: dict[str, float] | None = None
    parameter_shares_se: dict[str, float] | None = None  # their plug-in standard errors, with the standard error
    block_shares_se: dict[str, float] | None = None
    # model.next_checkpoint: the step the trainer really took beside the predicted one (Probe._against_next_checkpoint)
    next_checkpoint: dict | None = None


@dataclass
class RunInfo:
    """Everything results.json says besides the probe rows."""

    model: str | None
    learning_rate: float
    learning_rate_source: str
    update: str  # the update geometry: identity, adam_precondition or adamw_step (update.py)
    entropy_target: str  # token_mean, budget, per_token_avg or dr_grpo
    estimator: str  # rb or naive
    trainer: dict[str, dict]  # TRL's settings of the step: {name: {"value": ..., "source": config|checkpoint|default}}
    G: int
    G_E: int
    use_sequence_processor: bool
    sampling: dict = field(default_factory=dict)  # what q and the responses depend on: temperature, top_p, ...
    world_size: int = 1  # processes the prompts were split across (their sums all-reduced)
    checkpoint: str | None = None
    checkpoint_format: str | None = None  # hf_full, hf_lora or lightning
    global_step: int | None = None  # optimizer steps the checkpoint had taken
    next_checkpoint: str | None = None  # a later checkpoint of the same run, to hold the prediction against
    # The trainer's later optimizer steps on the same samples, which δH₁ does not predict (also printed)
    later_steps: str | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, summed
    memory: dict[str, float] = field(default_factory=dict)  # MiB per phase, filled by MemoryMonitor

    @property
    def preconditioner(self) -> str:
        """Whether an Adam state shapes the step ("adam") or not ("identity")."""
        return "identity" if self.update == "identity" else "adam"


@contextmanager
def timed_into(seconds: dict[str, float], key: str):
    """The wall time inside, added to seconds[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start


@dataclass
class RunResults:
    """The run so far: its settings and the finished probes."""

    info: RunInfo
    probes: list[ProbeResult] = field(default_factory=list)

    def timed(self, phase: str):
        """The time inside, added to the run's seconds of `phase`."""
        return timed_into(self.info.timings, phase)

    def to_dict(self) -> dict:
        """results.json: the settings, one row per probe, and their mean (with its standard error)."""
        results = {**asdict(self.info), "preconditioner": self.info.preconditioner}
        results["probes"] = [asdict(p) for p in self.probes]
        if any(p.mixed_update_fraction == 0 for p in self.probes):
            results["empty"] = no_mixed_outcomes(self.info.update, self.info.trainer)
        return summarise(results)


# The counterfactual entry that is not a token selection: {value, se, exists, delta_h1_at_checkpoint_coef,
# checkpoint_coef, delta_h1_at_zero_coef, delta_h1_slope (∂δH₁/∂c at c*), method ("linear" | "root search"), note}
ENTROPY_COEF_FOR_ZERO = "entropy_coef_for_zero"


def token_selections(counterfactuals: dict[str, dict]) -> dict[str, dict]:
    """A probe's counterfactual token selections, without the entropy_coef entry."""
    return {name: entry for name, entry in counterfactuals.items() if name != ENTROPY_COEF_FOR_ZERO}


NO_MIXED_OUTCOMES = (
    "every U prompt's responses got the same reward, so every advantage is 0 and δH₁ = 0 says nothing "
    "about the step: use a larger G, prompts the model solves sometimes, or a reward with partial credit"
)


def no_mixed_outcomes(update: str, trainer: dict[str, dict]) -> str:
    """What δH₁ is when no U prompt had mixed outcomes: 0 for a plain step, else the step the trainer takes
    anyway (AdamW's momentum and weight decay, an entropy bonus, a KL term), which does not learn from rewards."""
    anyway = [name for name, present in (
        ("AdamW's momentum and weight decay", update == "adamw_step"),
        ("the entropy bonus", bool(trainer.get("entropy_coef", {}).get("value"))),
        ("the KL term", bool(trainer.get("beta", {}).get("value"))),
    ) if present]  # fmt: skip
    if not anyway:
        return NO_MIXED_OUTCOMES
    return (
        "every U prompt's responses got the same reward, so every advantage is 0 and the rewards give the step "
        f"no gradient: δH₁ is the entropy change of what the trainer's step does without them ({', '.join(anyway)}), "
        "not of learning from this batch: use a larger G, prompts the model solves sometimes, or a reward with "
        "partial credit"
    )


def summarise(results: dict) -> dict:
    """Add the across-probe mean (top level) and its standard error to the results dict."""
    probes = results["probes"]
    if not probes:
        return results
    summary = {key: _mean([p[key] for p in probes]) for key in _AVERAGED}
    if all(p["delta_h1_se"] is not None for p in probes):  # plug-in SE of the mean of independent probes
        summary["delta_h1_se"] = math.sqrt(sum(p["delta_h1_se"] ** 2 for p in probes)) / len(probes)
    if probes[0].get("eta_sweep"):
        summary.update(_mean_sweep(probes))
    values = [p["delta_h1"] for p in probes]
    if len(values) > 1:
        mean = summary["delta_h1"]
        variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        summary["delta_h1_mean_se"] = math.sqrt(variance / len(values))
    summary["resolved"] = resolved(summary["delta_h1"], summary.get("delta_h1_mean_se", summary.get("delta_h1_se")))
    if len(probes) == 1:
        summary["sizes_for_target"] = probes[0].get("sizes_for_target")
        summary["sequential"] = probes[0].get("sequential")
    return {**results, **summary, "num_probes": len(probes)}


def _mean(values: list) -> float | int:
    """The mean; integers that are all equal (a batch size) stay an integer."""
    if all(isinstance(v, int) for v in values) and len(set(values)) == 1:
        return values[0]
    return sum(values) / len(values)


def _mean_sweep(probes: list[dict]) -> dict:
    """The η sweep's rows averaged over the probes (SEs combined as for independent means), and its summary."""
    n = len(probes)
    rows = []
    for eta_rows in zip(*(p["eta_sweep"] for p in probes)):
        row = {key: sum(r[key] for r in eta_rows) / n for key in eta_rows[0]}
        for key in ("delta_h_true_se", "ratio_se", "delta_h_true_on_E_se"):
            row[key] = math.sqrt(sum(r[key] ** 2 for r in eta_rows)) / n
        rows.append(row)
    noise_floor = max(p["eta_sweep_summary"]["noise_floor"] for p in probes)
    return {"eta_sweep": rows, "eta_sweep_summary": sweep_summary(rows, noise_floor)}


def resolution(record: dict, G: int | None = None) -> str | None:
    """Whether δH₁'s sign is resolved, and if not, what would resolve it: for results.json's top level or one
    probe's row (None without an SE)."""
    if record.get("resolved") is None:
        return None
    drawn = ""
    if record.get("sequential"):
        sequential, final = record["sequential"], record["sequential"]["stages"][-1]
        drawn = (
            f" after {len(sequential['stages'])} stages to B_E = {final['B_E']}, B_U = {final['B_U']} "
            f"({sequential['stopped']}, target SE/|δH₁| ≤ {sequential['target_rse']:.2g})"
        )
    if record["resolved"]:
        return f"resolved (|δH₁| ≥ 2 SE){drawn}"
    text = f"not resolved (|δH₁| < 2 SE: its sign is not known){drawn}"
    sizes = record.get("sizes_for_target")
    if sizes:
        at_g = f" at G = {G}" if G else ""
        cost = f", about {sizes['seconds'] / 60:.2g} min of sampling and passes" if sizes.get("seconds") else ""
        text += (
            f"; B_E = {sizes['B_E']} and B_U = {sizes['B_U']}{at_g} would bring the SE to |δH₁|/3{cost}: "
            f"--data.B_E {sizes['B_E']} --data.B_U {sizes['B_U']}"
        )
    return text


def later_steps(trainer: TrainerSettings) -> str | None:
    """What δH₁ does not predict when the trainer takes several optimizer steps on one generation batch."""
    steps = trainer.optimizer_steps_per_generation
    if steps == 1:
        return None
    return (
        f"num_iterations={trainer.num_iterations}, steps_per_generation={trainer.steps_per_generation}, "
        f"gradient_accumulation_steps={trainer.gradient_accumulation_steps}: the trainer takes {steps} optimizer "
        "steps on each generation batch; δH₁ predicts the first (importance ratio 1), the later steps on the same "
        "samples (off-policy) are not predicted"
    )


def _finite(value):
    """value with every NaN or infinite float replaced by None, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run_notes(
    update: str, G: int, G_E: int, entropy_target: str, estimator: str, trainer: TrainerSettings,
    reference_source: str | None = None,
) -> list[str]:
    """What a reader of the numbers must know about how they were made."""
    notes = []
    if update == "identity":
        notes.append("no optimizer state used: P = 1 (plain SGD geometry), not Adam's")
    if update == "adamw_step":
        notes.append(
            "update adamw_step: δH₁ = ⟨X̄, Δθ⟩ includes AdamW's momentum drift; the update prompt "
            "contributions linearise Δθ at the clipped ∇J̄ and sum to ⟨X̄, D ∇J̄⟩, not to δH₁"
        )
    if entropy_target == "dr_grpo":
        notes.append(
            "entropy_target dr_grpo (the seed's −S/L_max): its X̄ is biased when response lengths vary "
            "(L_max couples the G responses); token_mean is the entropy trainers log"
        )
    if entropy_target == "per_token_avg" and estimator == "naive":
        notes.append(
            "per_token_avg with estimator naive estimates ∇E[−S/|y|], which differs from ∇E[Σ_t H_t / |y|] when "
            "response lengths vary (1/|y| depends on the sampled tokens): use estimator rb"
        )
    notes.extend(_trainer_notes(trainer, reference_source))
    if G_E == 1:
        notes.append("G_E = 1: X uses no leave-one-out baseline (unbiased, higher variance)")
    if G == 1:
        notes.append("G = 1: every advantage is 0, so ∇J̄ = 0")
    return notes


def _trainer_notes(trainer: TrainerSettings, reference_source: str | None) -> list[str]:
    notes = []
    if trainer.loss_type == "bnpo":
        notes.append("loss_type bnpo: the U batch is one local batch, so its normaliser is dapo's (its tokens)")
    if trainer.loss_type == "cispo" and trainer.policy_scale < 1:
        notes.append(
            f"loss_type cispo: at ratio 1 its clamp min(1, epsilon_high={trainer.epsilon_upper}) scales the policy "
            f"gradient by {trainer.policy_scale}"
        )
    if trainer.use_adaptive_entropy:
        measured, target = trainer.last_world_entropy, trainer.entropy_target
        state = "no measurement yet (TRL's initial state)" if measured is None else f"last measured {measured:.4g}"
        on = f"applies entropy_coef={trainer.entropy_coef}" if trainer.entropy_bonus else "has no entropy bonus"
        notes.append(f"use_adaptive_entropy: {state} against entropy_target={target}, so the next step {on}")
    batch_wide = {"the entropy quantile": trainer.top_entropy_quantile < 1,
                  "the entropy bonus's token mean": trainer.entropy_bonus != 0}  # fmt: skip
    batch_wide = [name for name, used in batch_wide.items() if used]
    if batch_wide and trainer.gradient_accumulation_steps > 1:
        notes.append(
            f"gradient_accumulation_steps={trainer.gradient_accumulation_steps}: TRL takes {' and '.join(batch_wide)} "
            "over each microbatch (all processes), the probe over the whole U batch"
        )
    if trainer.beta:
        notes.append(f"beta={trainer.beta}: the KL term's reference model is {reference_source}")
    return notes


def write_json(path: Path, payload: dict) -> None:
    """Atomically (a reader, or a crash, never sees a half-written file), and strict JSON: a number that is
    not finite (a mean over nothing, a ratio to 0) is written as null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False))
    os.replace(tmp, path)
