"""The probe against the bare minimum work, on the same prompts and the same sampled sequences.

    python bench/bench_probe.py            # default model, B_E = B_U = 8, G = 4, max_new_tokens = 64 (~10 min)
    python bench/bench_probe.py --quick    # a sanity run (< 2 min)
    python bench/bench_probe.py --threads 1 --profile

The probe is EntropyProbe run by `Trainer.predict` with the callbacks of configs/sp.yaml, as train.py
runs it, standard_error off (the SE pass is extra work by design; it is timed on its own). The bare
minimum, in the same process and interleaved with the probe (probe, bare, bare, probe, ...), is plain
`model.generate` on the same prompts with the same seeds (so the same sequences, which is checked),
then per microbatch of tf_batch_size sequences one forward (`logits_to_keep`: response positions
only, as the probe), log_softmax, gather, the weighted sequence log-prob sum of MATH.md's L_X or L_Y,
and one backward into preallocated float32 gradient sums.

Memory, MiB above each phase's start:
- tensors: live tensor bytes allocated in the phase, from the torch profiler (profile_memory) in one
  run of each side kept apart from the timed runs; exact, whatever the allocator keeps.
- rss: the resident set's peak (VmHWM, reset through /proc/self/clear_refs after malloc_trim), in the
  timed runs: what the OS sees, including heap the allocator keeps after frees.
Writes bench/results/bench_probe.json and prints it.
"""

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from callbacks import BatchInvariants, DeltaH1Logger, MemoryMonitor
from probe_lightning.config import BatchConfig
from probe_lightning.data import PromptBatch, ProbeDataModule, format_prompt
from probe_lightning.module import EntropyProbe
from probe_lightning.rollout import Rollout
from probe_lightning.sequence_processor import GenerationConfig

_MIB = 2**20
PHASES = ("generate", "x_pass", "y_pass", "total")
_PROBE_PHASES = {"generate": "generate", "x_pass": "teacher_force_x", "y_pass": "teacher_force_y"}


# ---- measurement tools ----


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
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


class MeasuredProbe(EntropyProbe):
    """EntropyProbe whose timed phases also record their peak memory (MiB above the phase start) in info.memory."""

    meter = staticmethod(peak_rss)  # or tensor_peak

    @contextmanager
    def timed(self, phase: str):
        with self.meter(self.info.memory, phase), super().timed(phase):
            yield


class SeedPerBatch(pl.Callback):
    """torch.manual_seed(seed + batch index) before each rollout batch, as the bare generate does."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        torch.manual_seed(self.seed + batch_idx)


def run_probe(probe: MeasuredProbe, data: ProbeDataModule, seed: int) -> dict:
    """One probe through Trainer.predict: seconds per phase, the wall total, peaks, and its rollouts."""
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
            callbacks=[BatchInvariants(), DeltaH1Logger(), MemoryMonitor(), SeedPerBatch(seed)],
        )  # fmt: skip
        start = time.perf_counter()
        outputs = trainer.predict(probe, datamodule=data, return_predictions=True)
        total = time.perf_counter() - start
    del trainer
    gc.collect()  # the Trainer and the module refer to each other: free the finished probe's sums now
    timings = probe.info.timings
    run = {name: timings[phase] for name, phase in _PROBE_PHASES.items()}
    return {
        **run,
        "total": total,
        # what the three phases leave out: Trainer and callbacks, prompts, rewards, δH₁ (and the SE pass)
        "other": total - sum(run.values()),
        "timings": dict(timings),
        "peak_mib": {k: v for k, v in probe.info.memory.items() if not k.startswith("peak_")},  # not MemoryMonitor's
        "rollouts": [out.rollout for out in outputs],
    }


# ---- the bare minimum ----


def bare_generate(model, tokenizer, config: GenerationConfig, batches: list[PromptBatch], G: int, seed: int):
    """Plain model.generate per rollout batch, seeded as the probe's batches: ([B*G, T] per batch, seconds)."""
    hf_config = config.to_hf()
    inputs = []
    for batch in batches:  # tokenising is not model work: done before the clock starts
        prompts = [format_prompt(tokenizer, q) for q in batch.questions]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs.append((encoded.input_ids.repeat_interleave(G, 0), encoded.attention_mask.repeat_interleave(G, 0)))
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for index, (ids, mask) in enumerate(inputs):
            torch.manual_seed(seed + index)
            outputs.append(
                model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_config, tokenizer=tokenizer)
            )
    return outputs, time.perf_counter() - start


def bare_pass(model, rollouts: list[Rollout], tf_batch_size: int, grad_sums: list[torch.Tensor]) -> float:
    """One forward + backward per microbatch of the weighted S sum (L_X for E rollouts, L_Y for U): seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p, total in zip(params, grad_sums):
        p.grad = total  # a float32 model: backward adds into the sums in place
    start = time.perf_counter()
    for rollout in rollouts:
        G = rollout.batch.num_responses_per_prompt
        prompts_per_microbatch = max(1, tf_batch_size // G)
        for first in range(0, rollout.batch.num_prompts, prompts_per_microbatch):
            micro = rollout.select(slice(first, first + prompts_per_microbatch))
            batch = micro.batch
            ids, mask = batch.sequences.flatten(0, 1), batch.attention_masks.flatten(0, 1)
            with torch.enable_grad():
                logits = model(
                    input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    logits_to_keep=ids.shape[1] - batch.prompt_len + 1, use_cache=False,
                ).logits[:, :-1]  # fmt: skip
                token_logprobs = logits.log_softmax(-1).gather(-1, ids[:, batch.prompt_len :, None]).squeeze(-1)
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


def run_bare(model, tokenizer, config, batches, rollouts, G, seed, tf_batch_size, meter=peak_rss) -> dict:
    """The bare minimum's three phases, their peaks, and whether it sampled the probe's very sequences."""
    peaks: dict[str, float] = {}
    with meter(peaks, "generate"):
        generated, generate_seconds = bare_generate(model, tokenizer, config, batches, G, seed)
    grad_sums = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters() if p.requires_grad]
    run = {"generate": generate_seconds}
    for name, role in (("x_pass", "E"), ("y_pass", "U")):
        with meter(peaks, name):
            run[name] = bare_pass(model, [r for r in rollouts if r.role == role], tf_batch_size, grad_sums)
    return {**run, "total": sum(run.values()), "peak_mib": peaks, "same_sequences": _same(generated, rollouts)}


def _same(generated: list[torch.Tensor], rollouts: list[Rollout]) -> bool:
    """The bare generate's sequences equal the probe's: prompt and response tokens up to each gen_len."""
    for out, rollout in zip(generated, rollouts, strict=True):
        batch = rollout.batch
        for row, probe_row, n in zip(out, batch.sequences.flatten(0, 1), sum(batch.gen_lens, [])):
            if not torch.equal(row[: batch.prompt_len + n], probe_row[: batch.prompt_len + n]):
                return False
    return True


# ---- the benchmark ----


class Bench:
    """One model, shared by every probe and bare run of the benchmark."""

    def __init__(
        self, model: str, G: int, max_new_tokens: int, tf_batch_size: int, rollout_batch_size: int, seed: int
    ):
        self.model_name, self.G, self.seed, self.tf_batch_size = model, G, seed, tf_batch_size
        self.rollout_batch_size = rollout_batch_size
        self.generation = GenerationConfig(  # configs/sp.yaml's generation
            max_new_tokens=max_new_tokens, stop_strings=["</answer>"], gen_batch_size=32, tf_batch_size=tf_batch_size
        )
        self.policy = self.processor = None
        first = self.probe()
        first.configure_model()  # the model is loaded once, here
        self.policy, self.processor = first.policy, first.processor

    def probe(self, standard_error: bool = False, meter=peak_rss) -> MeasuredProbe:
        probe = MeasuredProbe(
            model=self.model_name, G=self.G, learning_rate=1e-6, generation=self.generation,
            standard_error=standard_error,
        )  # fmt: skip
        probe.meter = meter
        if self.policy is not None:
            probe.policy, probe.processor = self.policy, self.processor  # configure_model() then keeps them
        return probe

    def data(self, B: int) -> ProbeDataModule:
        batch_config = BatchConfig(rollout_batch_size=self.rollout_batch_size)
        return ProbeDataModule(B_E=B, B_U=B, batch_config=batch_config, seed=self.seed)

    def run_probe(self, B: int, standard_error: bool = False, meter=peak_rss) -> dict:
        return run_probe(self.probe(standard_error, meter), self.data(B), self.seed)

    def run_bare(self, B: int, rollouts: list[Rollout], meter=peak_rss) -> dict:
        data = self.data(B)
        data.setup("predict")
        return run_bare(
            self.policy, self.processor.tokenizer, self.processor.config, data.prompt_batches(), rollouts, self.G,
            self.seed, self.tf_batch_size, meter,
        )  # fmt: skip


def main(
    quick: bool = False,
    B: int = 8,
    G: int = 4,
    max_new_tokens: int = 64,
    tf_batch_size: int = 16,
    rollout_batch_size: int = 8,
    repeats: int = 2,
    sizes: list[int] | None = None,
    threads: int | None = None,
    seed: int = 0,
    model: str = "smollm2-135m-instruct",
    max_load: float = 1.5,
    max_wait_s: float = 300.0,
    profile: bool = False,
    output: str = "bench/results/bench_probe.json",
    command: str = "",
) -> dict:
    if quick:
        B, max_new_tokens, repeats, sizes = 2, 16, 1, sizes or [1, 2]
    sizes = sizes or [2, 4, 6, 8]
    if threads is not None:
        torch.set_num_threads(threads)
    waited = wait_for_quiet_machine(max_load, max_wait_s)
    load_start = os.getloadavg()
    busy_start, own_start = _cpu_seconds()
    wall_start = time.perf_counter()
    bench = Bench(model, G, max_new_tokens, tf_batch_size, rollout_batch_size, seed)

    warm = bench.run_probe(1)  # first-call costs of generate, autograd and the Trainer: not timed
    bench.run_bare(1, warm["rollouts"])

    probe_runs, bare_runs, rollouts = [], [], None
    for rep in range(repeats):  # probe, bare, bare, probe, ...: neither side always goes first
        for side in ("probe", "bare") if rep % 2 == 0 else ("bare", "probe"):
            if side == "probe":
                probe_runs.append(bench.run_probe(B))
                rollouts = probe_runs[-1].pop("rollouts")
            else:
                bare_runs.append(bench.run_bare(B, rollouts))
            print(f"rep {rep} {side}: {_seconds((probe_runs if side == 'probe' else bare_runs)[-1])}", flush=True)

    memory_probe = bench.run_probe(B, meter=tensor_peak)  # profiled: its times are not used
    memory_bare = bench.run_bare(B, memory_probe.pop("rollouts"), meter=tensor_peak)
    print(f"tensor peaks: probe {memory_probe['peak_mib']}, bare {memory_bare['peak_mib']}", flush=True)

    se_run = bench.run_probe(B, standard_error=True)
    se_run.pop("rollouts")
    print(f"probe with standard error: {_seconds(se_run)}, SE pass {se_run['timings']['standard_error']:.1f} s")

    linearity = []
    for size in sizes:
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
    bare_median = {phase: float(np.median([b[phase] for b in bare_runs])) for phase in PHASES}
    result = {
        "command": command,
        "settings": {
            "model": model, "B_E": B, "B_U": B, "G": G, "max_new_tokens": max_new_tokens,
            "tf_batch_size": tf_batch_size, "rollout_batch_size": rollout_batch_size, "repeats": repeats,
            "seed": seed, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
        },  # fmt: skip
        "machine_load": {
            "waited_s": waited,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            # CPU cores that other processes kept busy, on average, while the bench ran
            "other_processes_cores": (busy_end - busy_start - (own_end - own_start)) / wall,
            "bench_wall_s": wall,
        },
        "same_sequences": all(run["same_sequences"] for run in bare_runs + [memory_bare]),
        "probe": _summary(probe_runs, rollouts),
        "bare": _summary(bare_runs, rollouts),
        # medians of the per-pair ratios
        "ratios": {
            phase: float(np.median([p[phase] / b[phase] for p, b in zip(probe_runs, bare_runs)])) for phase in PHASES
        },
        "standard_error": {
            "seconds": se_run["timings"]["standard_error"],
            "extra_ratio_vs_bare_total": se_run["timings"]["standard_error"] / bare_median["total"],
            "extra_ratio_vs_bare_x_plus_y": se_run["timings"]["standard_error"]
            / (bare_median["x_pass"] + bare_median["y_pass"]),
            "rss_peak_mib": se_run["peak_mib"]["standard_error"],
        },
        "memory": _memory(probe_runs, bare_runs, memory_probe, memory_bare, rollouts, bench),
        "linearity": _linearity(linearity),
    }
    result["targets"] = {
        "overall_ratio_le_1.10": result["ratios"]["total"] <= 1.10,
        "teacher_forcing_peak_above_bare_le_1.5_logits": result["memory"]["tensors"]["probe_minus_bare_over_logits"]
        <= 1.5,
        "time_linear_r2_ge_0.98": result["linearity"]["r_squared"] >= 0.98,
    }
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return result


def _seconds(run: dict) -> str:
    return ", ".join(f"{k} {run[k]:.1f} s" for k in PHASES)


def _response_tokens(rollouts: list[Rollout]) -> int:
    return sum(sum(map(sum, r.batch.gen_lens)) for r in rollouts)


def _summary(runs: list[dict], rollouts: list[Rollout]) -> dict:
    """Median seconds per phase, response tokens per second, RSS peaks (max over runs)."""
    seconds = {phase: float(np.median([r[phase] for r in runs])) for phase in PHASES}
    tokens = _response_tokens(rollouts)
    summary = {
        "seconds": seconds,
        "seconds_per_run": [{phase: round(r[phase], 3) for phase in PHASES} for r in runs],
        "response_tokens": tokens,
        "tokens_per_s": {
            "generate": tokens / seconds["generate"],
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


def _memory(probe_runs, bare_runs, memory_probe, memory_bare, rollouts, bench) -> dict:
    """Teacher forcing's peak above the bare fwd+bwd of the same microbatches, against one microbatch's logits."""
    width = max(r.batch.sequences.shape[-1] - r.batch.prompt_len for r in rollouts)
    logits = bench.tf_batch_size * width * bench.policy.config.vocab_size * 4 / _MIB  # float32 [N, R, V]
    rss_probe = max(_teacher_forcing_peak(r["peak_mib"]) for r in probe_runs)
    rss_bare = max(_teacher_forcing_peak(r["peak_mib"]) for r in bare_runs)
    tensors_probe = _teacher_forcing_peak(memory_probe["peak_mib"])
    tensors_bare = _teacher_forcing_peak(memory_bare["peak_mib"])
    return {
        "model_parameters_mib": sum(p.numel() * p.element_size() for p in bench.policy.parameters()) / _MIB,
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
    for name, work in (("probe", lambda: bench.run_probe(B)), ("bare", lambda: bench.run_bare(B, rollouts))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            work()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (folder / f"profile_{name}.txt").write_text(table)
        print(f"---- profile: {name} ----\n{table}", flush=True)


def parse_args() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sanity run: B=2, max_new_tokens=16, sizes 1 2")
    parser.add_argument("--B", type=int, default=8, help="B_E = B_U of the probe/bare comparison")
    parser.add_argument("--G", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--tf_batch_size", type=int, default=16)
    parser.add_argument("--rollout_batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved probe/bare pairs")
    parser.add_argument("--sizes", type=int, nargs="+", help="B_E = B_U values of the linearity fit (default 2 4 6 8)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max_load", type=float, default=1.5, help="wait while the 1-min load average is above")
    parser.add_argument("--max_wait_s", type=float, default=300.0)
    parser.add_argument("--profile", action="store_true", help="also write torch.profiler tables")
    parser.add_argument("--output", default="bench/results/bench_probe.json")
    return vars(parser.parse_args())


if __name__ == "__main__":
    main(**parse_args(), command=" ".join(["python", *sys.argv]))
