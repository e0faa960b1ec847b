"""What one teacher-forcing pass costs, by kind, on the same sampled sequences of the default model.

    python bench/passes.py                      # 8 prompts x 4 responses of up to 64 new tokens, 2 rounds
    python bench/passes.py --profile_jvp true   # also torch.profiler's table of the forward-mode pass

Passes over the same 32 sequences, 16 per call unless said: the bare forward + backward (logits,
log_softmax, gather, backward of Σ log q), the probe's teacher forcing with its backward (from hidden
states, log q and entropies), a forward without gradients, and the forward-mode pass (jvp along a
random parameter direction, as the standard error's pass over U) at 8, 16 and 32 sequences per call.
Rounds alternate the order; reported: median seconds per pass and each against the bare pass.
"""

import time

import numpy as np
import torch
from bench_probe import bare_token_logprobs  # the bench's bare pass (bench/ is on sys.path when run)
from jsonargparse import CLI
from torch.profiler import ProfilerActivity, profile

from probe_lightning.data import format_prompt
from probe_lightning.directional import forward_mode_attention
from probe_lightning.models import DEFAULT_MODEL, load_model_and_tokenizer
from probe_lightning.problems import arithmetic_problems
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import BatchedSequences, SequenceProcessor


def main(prompts: int = 8, G: int = 4, max_new_tokens: int = 64, rounds: int = 2, profile_jvp: bool = False):
    """
    Args:
        prompts: prompts sampled (G responses each); passes go 16 sequences per call.
        G: responses per prompt.
        max_new_tokens: the generation budget.
        rounds: timed rounds (after one untimed warm-up of each pass).
        profile_jvp: also print torch.profiler's table of one forward-mode pass.
    """
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=["</answer>"])
    processor = SequenceProcessor(model, tokenizer, config)
    texts = [format_prompt(tokenizer, p.question) for p in arithmetic_problems(0)[:prompts]]
    batch = processor.generate_batched(texts, G, seeds=list(range(prompts * G)))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    primals = tuple(p.detach() for p in params)
    direction = tuple(torch.randn_like(p) * 1e-3 for p in params)

    def slices(sequences: int) -> list[BatchedSequences]:
        per_call = max(1, sequences // G)
        return [batch.select(slice(b, b + per_call)) for b in range(0, prompts, per_call)]

    def bare():
        for micro in slices(16):
            log_q = bare_token_logprobs(model, micro)
            (log_q * micro.response_mask.flatten(0, 1)).sum().backward()
        model.zero_grad(set_to_none=True)

    def probe_teacher_forcing():
        for micro in slices(16):
            tf = processor.teacher_force_logprobs(micro, with_grad=True)
            (tf.token_logprobs.sum() + tf.token_entropies.sum()).backward()
        model.zero_grad(set_to_none=True)

    def forward():
        for micro in slices(16):
            processor.teacher_force_logprobs(micro)

    def forward_mode(sequences: int):
        def run():
            with forward_mode_attention(model):
                for micro in slices(sequences):

                    def log_q(*values, micro=micro):
                        parameters = dict(zip(names, values))
                        return processor.teacher_force_logprobs(micro, parameters=parameters).token_logprobs

                    torch.func.jvp(log_q, primals, direction)

        return run

    passes = {
        "bare_forward_backward": bare,
        "probe_teacher_forcing": probe_teacher_forcing,
        "forward_no_grad": forward,
        "forward_mode_8": forward_mode(8),
        "forward_mode_16": forward_mode(16),
        "forward_mode_32": forward_mode(32),
    }
    seconds = {name: [] for name in passes}
    for round_ in range(rounds + 1):  # round 0 warms up, untimed
        order = list(passes.items()) if round_ % 2 else list(passes.items())[::-1]
        for name, work in order:
            start = time.perf_counter()
            with torch.enable_grad():
                work()
            if round_:
                seconds[name].append(time.perf_counter() - start)
    median = {name: float(np.median(times)) for name, times in seconds.items()}
    bare_seconds = median["bare_forward_backward"]
    tokens = int(batch.response_mask.sum())
    print({"sequences": prompts * G, "response_tokens": tokens, "threads": torch.get_num_threads()})
    for name, value in median.items():
        print(f"{name:24s} {value:7.2f} s   {value / bare_seconds:5.2f} x bare")
    if profile_jvp:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward_mode(16)()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    CLI(main, as_positional=False)
