"""The probe against the bare minimum work, on the same prompts and the same sampled sequences.

    python bench/bench_probe.py                    # configs/sp.yaml's probe, B_E = B_U = 8 (~15 min, 2 cores)
    python bench/bench_probe.py --quick true       # a sanity run (~3 min)
    python bench/bench_probe.py --sizes [2,4,6,8]  # also the time's linearity in the batch sizes
    python bench/bench_probe.py --threads 1 --profile true

The probe is EntropyProbe, ProbeDataModule and the Trainer's callbacks built from configs/sp.yaml by
LightningCLI, as `train.py predict` builds them, then run by `Trainer.predict`: the default config end to
end, its standard error, contributions and covariance proxy included. On top of the YAML the bench sets
only: B_E = B_U (its own sizes), the Trainer's logger, progress bar and checkpointing off, data.seed with
--seed, and with --quick a smaller max_new_tokens. The bare minimum, in the same process and interleaved
with the probe (probe, bare, bare, probe, ...), is one plain `model.generate` per batch, drawing with the
probe's seeded sampler (the same sequences but where the loop's other matmul kernel moves a draw: the
share drawn alike is reported), then, on the probe's sequences, per teacher-forcing microbatch of
the probe (the same prompt slices: one prompt per forward over E with the standard error on)
one forward (`logits_to_keep`: response positions only, as the probe), log_softmax, gather, a
weighted sum of the sequence log-probs S (the seed's L_X or L_Y of docs/math.md: dr_grpo, A / L_max; the
weights do not change the cost, so it is a floor for every entropy_target and estimator), and one
backward into preallocated float32 gradient sums.

The standard_error phase (one forward-mode pass over U: the SE, contributions) has no bare
counterpart: it is in the probe's total, and its share of that total is reported.

Memory, MiB above each of the probe's timed phases (RunResults.timed) at its start:
- tensors: live tensor bytes allocated in the phase, from the torch profiler (profile_memory) in one
  run of each side kept apart from the timed runs; exact, whatever the allocator keeps.
- rss: the resident set's peak (VmHWM, reset through /proc/self/clear_refs after malloc_trim), in the
  timed runs: what the OS sees, including heap the allocator keeps after frees.
- tf_batch_size: one E microbatch's teacher forcing with its backward, the probe's against the bare pass
  (which holds the microbatch's logits, as teacher forcing did before it worked from hidden states), at
  the default tf_batch_size and larger ones: the largest the probe fits in the bare pass's memory.
Writes bench/results/bench_probe.json and prints it.
"""

import copy
import ctypes
import gc
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from jsonargparse import CLI
from torch.profiler import ProfilerActivity, profile

from probe_lightning import estimators
from probe_lightning.accumulator import ProbeSums
from probe_lightning.data import ProbeDataModule, PromptBatch, format_prompt
from probe_lightning.module import EntropyProbe
from probe_lightning.results import RunResults
from probe_lightning.rollout import Rollout, sample_seed
from probe_lightning.sequence_processor import BatchedSequences, SequenceProcessor
from train import ProbeCLI

_MIB = 2**20
PHASES = ("generate", "x_pass", "y_pass", "total")
_PROBE_PHASES = {"generate": "generate", "x_pass": "teacher_force_x", "y_pass": "teacher_force_y",
                 "standard_error": "standard_error"}  # fmt: skip
# The bench's only settings on top of the YAML's Trainer: nothing written to disk, nothing printed per batch.
_QUIET_TRAINER = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                  "enable_checkpointing": False}  # fmt: skip
_QUICK_MAX_NEW_TOKENS = 16


# ---- measurement tools ----


def _status_mib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def peak_rss(record: dict, key: str):
    """record[key] = max(record[key], peak RSS in the block - RSS at its start), MiB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: the peak counts pages touched now
    except (OSError, AttributeError):
        pass
    start = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
    try:
        yield
    finally:
        record[key] = max(record.get(key, 0.0), _status_mib("VmHWM") - start)


@contextmanager
def tensor_peak(record: dict, key: str):
    """record[key] = max(record[key], peak of the tensor bytes allocated in the block and still live), MiB."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    changes = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    record[key] = max(record.get(key, 0.0), peak / _MIB)


Meter = Callable[[dict, str], object]  # peak_rss or tensor_peak


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    times = os.times()
    return busy / ticks, times.user + times.system


def wait_for_quiet_machine(max_load: float, max_wait_s: float, poll_s: float = 20.0) -> float:
    """Wait while the 1-minute load average exceeds max_load (at most max_wait_s); return the seconds waited."""
    start = time.perf_counter()
    while os.getloadavg()[0] > max_load and time.perf_counter() - start < max_wait_s:
        print(f"load average {os.getloadavg()[0]:.2f} > {max_load}: waiting {poll_s:.0f} s", flush=True)
        time.sleep(poll_s)
    return time.perf_counter() - start


# ---- the probe ----


@dataclass
class MeteredResults(RunResults):
    """RunResults whose timed phases also record their peak memory (MiB above the phase start) in peak_mib."""

    meter: Meter = peak_rss
    peak_mib: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str):
        with self.meter(self.peak_mib, phase), super().timed(phase):  # the meter's own work is not timed
            yield


class BenchHooks(pl.Callback):
    """Meters the probe's phases and keeps its rollouts."""

    def __init__(self, meter: Meter):
        self.meter = meter
        self.results: MeteredResults | None = None
        self.rollouts: list[Rollout] = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        probe = pl_module.probe  # built by EntropyProbe.on_predict_start, which runs after callbacks' hooks
        if self.results is None:
            self.results = MeteredResults(probe.results.info, probe.results.probes, meter=self.meter)
            probe.results = self.results

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.rollouts.append(outputs.rollout)


# ---- the bare minimum ----


def bare_generate(processor: SequenceProcessor, batches: list[PromptBatch], G: int, G_E: int):
    """One model.generate per rollout batch with the probe's seeded sampler (each response from its own
    generator, bench/sampling.py measures what that costs): ([B*G, T] per batch, seconds)."""
    model, tokenizer = processor.model, processor.tokenizer
    inputs = []
    for batch in batches:  # tokenising is not model work: done before the clock starts
        prompts = [format_prompt(tokenizer, q) for q in batch.questions]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        n = G_E if batch.role == "E" else G
        seeds = [sample_seed(batch, prompt_id, g) for prompt_id in batch.prompt_ids for g in range(n)]
        ids, mask = encoded.input_ids.repeat_interleave(n, 0), encoded.attention_mask.repeat_interleave(n, 0)
        inputs.append((ids, mask, seeds))
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for ids, mask, seeds in inputs:
            outputs.append(processor.sample(ids, mask, seeds=seeds))
    return outputs, time.perf_counter() - start


def _forward_inputs(batch: BatchedSequences) -> dict:
    ids, mask = batch.sequences.flatten(0, 1), batch.attention_masks.flatten(0, 1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "use_cache": False}  # fmt: skip


def bare_token_logprobs(model, batch: BatchedSequences) -> torch.Tensor:
    """The bare minimum's log q(y_t), [B*G, R]: one forward keeping the response positions' logits (as the
    probe keeps only those), log_softmax, gather."""
    inputs = _forward_inputs(batch)
    ids, P = inputs["input_ids"], batch.prompt_len
    logits = model(**inputs, logits_to_keep=ids.shape[1] - P + 1).logits[:, :-1]
    return logits.log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1)


def bare_pass(
    processor: SequenceProcessor, rollouts: list[Rollout], grad_sums: list[torch.Tensor], one_prompt: bool = False
) -> float:
    """One forward + backward per microbatch of the weighted S sum (L_X for E rollouts, L_Y for U): seconds.
    one_prompt: one prompt per microbatch, as the probe's E pass with the standard error."""
    model = processor.model
    params = [p for p in model.parameters() if p.requires_grad]
    for p, total in zip(params, grad_sums):
        p.grad = total  # a float32 model: backward adds into the sums in place
    start = time.perf_counter()
    for rollout in rollouts:
        G = rollout.batch.num_responses_per_prompt
        slices = processor.microbatches(rollout.batch.num_prompts, G)  # the probe's prompt slices
        if one_prompt:
            slices = [slice(b, b + 1) for b in range(rollout.batch.num_prompts)]
        for rows in slices:
            micro = rollout.select(rows)
            batch = micro.batch
            with torch.enable_grad():
                token_logprobs = bare_token_logprobs(model, batch)
                S = (token_logprobs * batch.response_mask.flatten(0, 1)).sum(-1).view(batch.num_prompts, G)
                if rollout.role == "E":  # L_X = -(1/G) Σ c_g S_g, c_g the LOO-centred S_g / L_max (dr_grpo)
                    weighted = S.detach() / micro.max_lengths[:, None]
                    weights = -(weighted - (weighted.sum(1, keepdim=True) - weighted) / max(G - 1, 1)) / G
                else:  # L_Y = (1/G) Σ A_g / L_max S_g
                    weights = micro.advantages / micro.max_lengths[:, None] / G
                (weights * S).sum().backward()
    elapsed = time.perf_counter() - start
    for p in params:
        p.grad = None
    return elapsed


def _compare(processor: SequenceProcessor, generated: list[torch.Tensor], rollouts: list[Rollout]) -> dict:
    """The bare generate's sequences against the probe's: the share of responses drawn token for token, and
    the bare's own response tokens. Draws differ where another matmul kernel's float32 rounding (the loop's
    oneDNN on a CPU) moves q across a uniform's point of the CDF, and the response goes its own way from there."""
    same, responses, tokens = 0, 0, 0
    for out, rollout in zip(generated, rollouts, strict=True):
        batch, P = rollout.batch, rollout.batch.prompt_len
        lengths = processor.response_lengths(out[:, P:]).tolist()
        tokens += sum(lengths)
        probe_lengths = [n for lens in batch.gen_lens for n in lens]
        for row, probe_row, n, m in zip(out, batch.sequences.flatten(0, 1), probe_lengths, lengths, strict=True):
            same += n == m and torch.equal(row[: P + n], probe_row[: P + n])
            responses += 1
    return {"same_responses": same / responses, "response_tokens": tokens}


# ---- the benchmark ----


class Bench:
    """The probe of a LightningCLI config, with one model shared by every probe and bare run of the benchmark."""

    def __init__(self, config: dict, B: int):
        self.config = config
        model, data, _ = self.instantiate(B)
        model.configure_model()  # the model is loaded once, here
        self.loaded = model.policy, model.processor, model.loaded_checkpoint
        self.processor: SequenceProcessor = model.processor
        self.settings = model.settings
        self.seed = data.hparams.seed  # the prompt draw's seed; with probe, role and prompt id it seeds sampling

    def instantiate(self, B: int, root: str | None = None, callbacks=()):
        """(EntropyProbe, ProbeDataModule, Trainer) from the config, as LightningCLI builds them for train.py."""
        config = copy.deepcopy(self.config)
        config["data"].update(B_E=B, B_U=B)
        config["trainer"].update(_QUIET_TRAINER, default_root_dir=root)
        with warnings.catch_warnings():  # it warns that args and sys.argv (the bench's own flags) are both given
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = ProbeCLI(
                EntropyProbe, ProbeDataModule, args=config, run=False, save_config_callback=None,
                trainer_defaults={"callbacks": list(callbacks)},
            )  # fmt: skip
        return cli.model, cli.datamodule, cli.trainer

    def run_probe(self, B: int, meter: Meter = peak_rss) -> dict:
        """One probe through Trainer.predict: seconds per phase, the wall total, peaks, and its rollouts."""
        hooks = BenchHooks(meter)
        with tempfile.TemporaryDirectory() as root:
            model, data, trainer = self.instantiate(B, root, [hooks])
            model.policy, model.processor, model.loaded_checkpoint = self.loaded  # configure_model() keeps them
            start = time.perf_counter()
            trainer.predict(model, datamodule=data, return_predictions=False)
            total = time.perf_counter() - start
        timings = dict(hooks.results.info.timings)
        del model, data, trainer
        gc.collect()  # the Trainer and the module refer to each other: free the finished probe's vectors now
        run = {name: timings.get(phase, 0.0) for name, phase in _PROBE_PHASES.items()}
        return {
            **run,
            "total": total,
            # what the phases leave out: Trainer and callbacks, prompts, rewards, δH₁, tables
            "other": total - sum(run.values()),
            "timings": timings,
            "peak_mib": hooks.results.peak_mib,
            "rollouts": hooks.rollouts,
        }

    def run_bare(self, rollouts: list[Rollout], meter: Meter = peak_rss) -> dict:
        """The bare minimum on a probe run's prompt batches: its three phases, their peaks, and whether it
        sampled that run's very sequences."""
        model, batches = self.processor.model, [r.prompts for r in rollouts]
        peaks: dict[str, float] = {}
        with meter(peaks, "generate"):
            generated, generate_seconds = bare_generate(self.processor, batches, self.settings.G, self.settings.G_E)
        # ΣX and ΣY, both kept (δH₁ needs the two), allocated before the passes as the probe does
        grad_sums = {role: [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters() if p.requires_grad]
                     for role in ("E", "U")}  # fmt: skip
        run = {"generate": generate_seconds}
        for name, role in (("x_pass", "E"), ("y_pass", "U")):
            one_prompt = role == "E" and self.settings.standard_error  # the probe's E slices
            with meter(peaks, name):
                run[name] = bare_pass(
                    self.processor, [r for r in rollouts if r.role == role], grad_sums[role], one_prompt
                )
        compared = _compare(self.processor, generated, rollouts)
        return {**run, "total": sum(run.values()), "peak_mib": peaks, **compared}


def main(
    config: str = "configs/sp.yaml",
    quick: bool = False,
    B: int = 8,
    repeats: int = 2,
    sizes: list[int] | None = None,
    tf_batch_sizes: list[int] | None = None,
    seed: int | None = None,
    threads: int | None = None,
    max_load: float = 1.5,
    max_wait_s: float = 300.0,
    profile: bool = False,
    output: str = "bench/results/bench_probe.json",
) -> dict:
    """The probe against the bare minimum work, on the same sampled sequences; writes `output` and prints it.

    Args:
        config: the probe's LightningCLI config; model, data and the Trainer's callbacks come from it.
        quick: a sanity run: B = 2, max_new_tokens = 16, one repeat.
        B: B_E = B_U of the probe/bare comparison.
        repeats: interleaved probe/bare pairs.
        sizes: B_E = B_U values of a linearity fit of the time (none by default).
        tf_batch_sizes: teacher-forcing microbatch sizes (sequences) of the memory comparison; default: the
            config's tf_batch_size times 1, 2 and 3.
        seed: the config's data.seed (the prompt draw, and with probe, role and prompt id each response's
            sampling). None: the config's.
        threads: torch intra-op threads (None: torch's default).
        max_load: wait while the 1-minute load average is above this...
        max_wait_s: ...for at most this many seconds.
        profile: also write torch.profiler tables of one probe and one bare run next to `output`.
        output: the JSON file to write.
    """
    command = " ".join(["python", *sys.argv])
    for name in ("lightning.pytorch", "lightning.fabric"):  # each run's Trainer banner, seed and tip lines
        logging.getLogger(name).setLevel(logging.WARNING)
    settings = yaml.safe_load(Path(config).read_text())
    settings.pop("return_predictions", None)  # a `predict` option: the bench keeps the rollouts through a callback
    settings.setdefault("model", {})
    settings.setdefault("data", {})
    settings.setdefault("trainer", {})
    if quick:
        B, repeats = 2, 1
        settings["model"].setdefault("generation", {})["max_new_tokens"] = _QUICK_MAX_NEW_TOKENS
    if seed is not None:
        settings["data"]["seed"] = seed
    if threads is not None:
        torch.set_num_threads(threads)
    waited = wait_for_quiet_machine(max_load, max_wait_s)
    load_start = os.getloadavg()
    busy_start, own_start = _cpu_seconds()
    wall_start = time.perf_counter()
    bench = Bench(settings, B)

    # Untimed, at full size: the first run of a size pays for first calls and for growing the heap
    # (about 10% more time), which would otherwise fall on whichever side runs first.
    warm = bench.run_probe(B)
    bench.run_bare(warm["rollouts"])

    probe_runs, bare_runs, rollouts = [], [], None
    for rep in range(repeats):  # probe, bare, bare, probe, ...: neither side always goes first
        for side in ("probe", "bare") if rep % 2 == 0 else ("bare", "probe"):
            if side == "probe":
                probe_runs.append(bench.run_probe(B))
                rollouts = probe_runs[-1].pop("rollouts")
            else:
                bare_runs.append(bench.run_bare(rollouts))
            print(f"rep {rep} {side}: {_seconds((probe_runs if side == 'probe' else bare_runs)[-1])}", flush=True)

    memory_probe = bench.run_probe(B, meter=tensor_peak)  # profiled: its times are not used
    memory_bare = bench.run_bare(memory_probe.pop("rollouts"), meter=tensor_peak)
    print(f"tensor peaks: probe {memory_probe['peak_mib']}, bare {memory_bare['peak_mib']}", flush=True)
    default_tf = bench.processor.config.tf_batch_size
    microbatches = _microbatch_memory(bench, rollouts, tf_batch_sizes or [default_tf * k for k in (1, 2, 3)])

    linearity = []
    for size in sizes or []:
        run = bench.run_probe(size)
        linearity.append(
            {
                "B_E_plus_B_U": 2 * size,
                "total_s": run["total"],
                "response_tokens": _response_tokens(run.pop("rollouts")),
                "teacher_forcing_rss_peak_mib": _teacher_forcing_peak(run["peak_mib"]),
                "generate_rss_peak_mib": run["peak_mib"]["generate"],
            }
        )
        print(f"B_E + B_U = {2 * size}: {run['total']:.1f} s", flush=True)

    if profile:
        _profile(bench, B, rollouts, Path(output).parent)

    busy_end, own_end = _cpu_seconds()
    wall = time.perf_counter() - wall_start
    probe_median = {phase: float(np.median([r[phase] for r in probe_runs])) for phase in (*PHASES, "standard_error")}
    bare_median = {phase: float(np.median([b[phase] for b in bare_runs])) for phase in PHASES}
    generation = bench.processor.config
    result = {
        "command": command,
        "settings": {
            "config": config, "B_E": B, "B_U": B, "repeats": repeats, "quick": quick,
            "probe": asdict(bench.settings),
            "data": {k: v for k, v in settings["data"].items() if k not in ("B_E", "B_U")},
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        },  # fmt: skip
        "machine_load": {
            "waited_s": waited,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            # CPU cores that other processes kept busy, on average, while the bench ran
            "other_processes_cores": (busy_end - busy_start - (own_end - own_start)) / wall,
            "bench_wall_s": wall,
        },
        # the share of the probe's responses the bare generate drew token for token (the passes of both
        # teacher-force the probe's sequences)
        "bare_generate_same_responses": min(run["same_responses"] for run in bare_runs + [memory_bare]),
        "probe": _summary(probe_runs, _response_tokens(rollouts)),
        "bare": _summary(bare_runs, _response_tokens(rollouts), bare_runs[0]["response_tokens"]),
        # medians of the per-pair ratios; the probe's total includes its standard_error phase
        "ratios": {
            **{phase: float(np.median([p[phase] / b[phase] for p, b in zip(probe_runs, bare_runs)])) for phase in PHASES},
            # seconds per drawn token: where some draws differ, the two generate different numbers of tokens
            "generate_per_token": float(np.median([
                (p["generate"] / _response_tokens(rollouts)) / (b["generate"] / b["response_tokens"])
                for p, b in zip(probe_runs, bare_runs)
            ])),
        },
        # the forward-mode pass (SE, contributions): its share of the probe's total, and against the bare total
        "standard_error": {
            "seconds": probe_median["standard_error"],
            "share_of_probe_total": probe_median["standard_error"] / probe_median["total"],
            "extra_ratio_vs_bare_total": probe_median["standard_error"] / bare_median["total"],
            "rss_peak_mib": max(r["peak_mib"].get("standard_error", 0.0) for r in probe_runs),
        },
        "memory": _memory(probe_runs, bare_runs, memory_probe, memory_bare, rollouts, bench.processor),
        "tf_batch_size": microbatches,
    }
    if linearity:
        result["linearity"] = _linearity(linearity)
    result["targets"] = {  # issue 14's, set for the default config: B_E = B_U = 8, G = 4, max_new_tokens = 64
        "apply_here": (B, bench.settings.G, generation.max_new_tokens) == (8, 4, 64),
        "total_ratio_le_1.20": result["ratios"]["total"] <= 1.20,
        "generate_ratio_le_0.5": result["ratios"]["generate"] <= 0.5,
        "teacher_forcing_peak_above_model_le_0.25_logits": microbatches["probe_over_logits"][0] <= 0.25,
    }
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return result


def _seconds(run: dict) -> str:
    return ", ".join(f"{k} {run[k]:.1f} s" for k in (*PHASES, "standard_error") if k in run)


def _repeated(batch: BatchedSequences, num_prompts: int) -> BatchedSequences:
    """num_prompts prompts cycling through batch's, with their responses: a microbatch of any size."""
    rows = [b % batch.num_prompts for b in range(num_prompts)]
    return replace(
        batch, sequences=batch.sequences[rows], attention_masks=batch.attention_masks[rows],
        prompt_lens=[batch.prompt_len] * num_prompts, gen_lens=[batch.gen_lens[b] for b in rows],
        responses_text=[batch.responses_text[b] for b in rows], token_logprobs=None, token_entropies=None,
    )  # fmt: skip


def _microbatch_memory(bench: "Bench", rollouts: list[Rollout], sizes: list[int]) -> dict:
    """Tensor peaks (MiB) of one E microbatch's teacher forcing and backward into preallocated sums, for
    each size (sequences): the probe's, the bare pass's (which holds the logits), and the model's alone
    (forward to the final hidden states and backward, no output layer)."""
    processor, settings = bench.processor, bench.settings
    model = processor.model
    batch = next(r for r in rollouts if r.role == "E").batch
    G, R = batch.num_responses_per_prompt, batch.response_mask.shape[-1]
    accumulator = ProbeSums([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    add_gradient = partial(accumulator.add_gradient, accumulator.sum_x)  # sums allocated before any peak
    rows = []
    for size in sizes:
        micro = _repeated(batch, max(1, size // G))
        sized = SequenceProcessor(model, processor.tokenizer, replace(processor.config, tf_batch_size=size))
        max_lengths = torch.tensor(micro.gen_lens, dtype=torch.float32).amax(1).clamp(min=1)
        peaks: dict[str, float] = {}
        with tensor_peak(peaks, "probe"):
            tf = sized.teacher_force_logprobs(micro, with_grad=True)
            terms = estimators.entropy_components(
                tf.token_logprobs, tf.token_entropies, tf.response_mask, max_lengths, settings.entropy_target,
                settings.estimator, processor.config.max_new_tokens,
            )  # fmt: skip
            add_gradient(terms.mean(1).sum())
            del tf, terms
        with tensor_peak(peaks, "bare"):
            logprobs = bare_token_logprobs(model, micro)
            add_gradient((logprobs * micro.response_mask.flatten(0, 1)).sum())
            del logprobs
        with tensor_peak(peaks, "model_alone"):
            hidden = model.get_decoder()(**_forward_inputs(micro)).last_hidden_state
            add_gradient(hidden[:, micro.prompt_len - 1 : -1].sum())
            del hidden
        logits_mib = micro.num_sequences * R * len(processor.tokenizer) * 4 / _MIB
        rows.append({"tf_batch_size": micro.num_sequences, **{f"{k}_mib": v for k, v in peaks.items()},
                     "logits_mib": logits_mib})  # fmt: skip
        print(f"tf_batch_size {micro.num_sequences}: {rows[-1]}", flush=True)
    budget = rows[0]["bare_mib"]  # teacher forcing's memory at the default size when it held the logits
    fitting = [row["tf_batch_size"] for row in rows if row["probe_mib"] <= budget]
    return {
        "rows": rows,
        # what teacher forcing holds above the model's own forward and backward, in one microbatch's logits
        "probe_over_logits": [(row["probe_mib"] - row["model_alone_mib"]) / row["logits_mib"] for row in rows],
        "bare_over_logits": [(row["bare_mib"] - row["model_alone_mib"]) / row["logits_mib"] for row in rows],
        "largest_tf_batch_size_within_the_bare_default_peak": max(fitting) if fitting else None,
        "sizes_tried": [row["tf_batch_size"] for row in rows],
    }


def _response_tokens(rollouts: list[Rollout]) -> int:
    return sum(sum(map(sum, r.batch.gen_lens)) for r in rollouts)


def _summary(runs: list[dict], tokens: int, generated_tokens: int | None = None) -> dict:
    """Median seconds per phase, response tokens per second (generate's over the tokens it drew), RSS peaks."""
    seconds = {phase: float(np.median([r[phase] for r in runs])) for phase in PHASES}
    generated_tokens = generated_tokens or tokens
    summary = {
        "seconds": seconds,
        "seconds_per_run": [{phase: round(r[phase], 3) for phase in PHASES} for r in runs],
        "response_tokens": tokens,
        "generated_tokens": generated_tokens,
        "tokens_per_s": {
            "generate": generated_tokens / seconds["generate"],
            "teacher_forcing": tokens / (seconds["x_pass"] + seconds["y_pass"]),
            "total": tokens / seconds["total"],
        },
    }
    if "timings" in runs[0]:
        summary["seconds"]["other"] = float(np.median([r["other"] for r in runs]))
        summary["probe_timings"] = {k: float(np.median([r["timings"][k] for r in runs])) for k in runs[0]["timings"]}
    return summary


def _teacher_forcing_peak(peaks: dict) -> float:
    return max(peaks.get(k, 0.0) for k in ("teacher_force_x", "teacher_force_y", "x_pass", "y_pass"))


def _memory(probe_runs, bare_runs, memory_probe, memory_bare, rollouts, processor: SequenceProcessor) -> dict:
    """Teacher forcing's peak above the bare fwd+bwd of the same microbatches, against one microbatch's logits."""
    width = max(r.batch.sequences.shape[-1] - r.batch.prompt_len for r in rollouts)
    vocab = processor.model.config.vocab_size
    logits = processor.config.tf_batch_size * width * vocab * 4 / _MIB  # float32 [N, R, V]
    rss_probe = max(_teacher_forcing_peak(r["peak_mib"]) for r in probe_runs)
    rss_bare = max(_teacher_forcing_peak(r["peak_mib"]) for r in bare_runs)
    tensors_probe = _teacher_forcing_peak(memory_probe["peak_mib"])
    tensors_bare = _teacher_forcing_peak(memory_bare["peak_mib"])
    return {
        "model_parameters_mib": sum(p.numel() * p.element_size() for p in processor.model.parameters()) / _MIB,
        "one_microbatch_logits_mib": logits,
        "tensors": {
            "probe_phases_mib": memory_probe["peak_mib"],
            "bare_phases_mib": memory_bare["peak_mib"],
            "teacher_forcing_probe_mib": tensors_probe,
            "teacher_forcing_bare_mib": tensors_bare,
            "probe_minus_bare_mib": tensors_probe - tensors_bare,
            "probe_minus_bare_over_logits": (tensors_probe - tensors_bare) / logits,
        },
        "rss": {
            "probe_phases_mib": {k: max(r["peak_mib"][k] for r in probe_runs) for k in probe_runs[0]["peak_mib"]},
            "bare_phases_mib": {k: max(r["peak_mib"][k] for r in bare_runs) for k in bare_runs[0]["peak_mib"]},
            "teacher_forcing_probe_mib": rss_probe,
            "teacher_forcing_bare_mib": rss_bare,
            "probe_minus_bare_over_logits": (rss_probe - rss_bare) / logits,
        },
        "rss_mib_at_end": _status_mib("VmRSS"),
    }


def _linearity(points: list[dict]) -> dict:
    """Least-squares line total_s = a + b (B_E + B_U), its R², and how far the memory peaks move."""
    x = np.array([p["B_E_plus_B_U"] for p in points], dtype=float)
    y = np.array([p["total_s"] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    peaks = [p["teacher_forcing_rss_peak_mib"] for p in points]
    return {
        "points": points,
        "r_squared": float(1 - residual @ residual / ((y - y.mean()) @ (y - y.mean()))),
        "seconds_per_prompt": float(slope),
        "intercept_s": float(intercept),
        "teacher_forcing_rss_peak_range_mib": [min(peaks), max(peaks)],
    }


def _profile(bench: Bench, B: int, rollouts: list[Rollout], folder: Path) -> None:
    """torch.profiler tables (top ops by self CPU time) of one probe and one bare run, next to the JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, work in (("probe", lambda: bench.run_probe(B)), ("bare", lambda: bench.run_bare(rollouts))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            work()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (folder / f"profile_{name}.txt").write_text(table)
        print(f"---- profile: {name} ----\n{table}", flush=True)


if __name__ == "__main__":
    CLI(main, as_positional=False)
