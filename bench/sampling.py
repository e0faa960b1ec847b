"""The probe's sampling against plain `model.generate`: the probe's own loop (decoding.py: one prefill per
prompt, ended responses leave the batch, one seeded uniform per row and step) against generate's
multinomial sampling from the same q, same prompts, same sequences per call.

    python bench/sampling.py                 # default model, 32 sequences of up to 64 new tokens, 3 rounds

Both are timed alternately in one process; reported: new tokens per second (tokens of the responses,
up to their ends) and the ratio, and against what this machine's FLOPs allow: the output layer's matmul at
the batch's rows with torch's default kernel (MKL on x86) and with oneDNN on a packed weight (what the loop
uses on a CPU, decoding.packed_linears), and each method's model GFLOPS (2 x linear weights x token rows it
computes, prefill included, per second). The loop saves the repeated prompt reads and the steps of ended
rows; its kernel is the rest (torch's default, MKL, is slow on AMD CPUs).
"""

import time
from contextlib import nullcontext

import torch
from jsonargparse import CLI

from probe_lightning.data import format_prompt
from probe_lightning.decoding import packed_linears
from probe_lightning.models import DEFAULT_MODEL, load_model_and_tokenizer
from probe_lightning.problems import arithmetic_problems
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor


def main(sequences: int = 32, max_new_tokens: int = 64, rounds: int = 3, G: int = 4):
    """
    Args:
        sequences: sequences per generate call (the default gen_batch_size).
        max_new_tokens: the generation budget.
        rounds: alternating (plain, probe) pairs.
        G: responses per prompt.
    """
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    config = GenerationConfig(max_new_tokens=max_new_tokens, gen_batch_size=sequences, stop_strings=["</answer>"])
    processor = SequenceProcessor(model, tokenizer, config)
    prompts = [format_prompt(tokenizer, p.question) for p in arithmetic_problems(0)[: sequences // G]]
    seconds, tokens, rows = {"plain": 0.0, "probe": 0.0}, {"plain": 0, "probe": 0}, {"plain": 0, "probe": 0}
    for round_ in range(rounds + 1):  # round 0 warms up, untimed
        for method in ("plain", "probe") if round_ % 2 else ("probe", "plain"):
            torch.manual_seed(round_)
            seeds = list(range(round_ * sequences, (round_ + 1) * sequences)) if method == "probe" else None
            start = time.perf_counter()
            batch = processor.generate_batched(prompts, G, seeds=seeds)
            if round_:
                seconds[method] += time.perf_counter() - start
                tokens[method] += sum(sum(lens) for lens in batch.gen_lens)
                rows[method] += token_rows(batch, method, G)
    rates = {m: tokens[m] / seconds[m] for m in seconds}
    ratio = rates["probe"] / rates["plain"]
    flops_per_row = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    model_gflops = {m: flops_per_row * rows[m] / seconds[m] / 1e9 for m in seconds}
    head = model.get_output_embeddings().weight.detach()
    matmul_gflops = {n: output_layer_gflops(head, n) for n in (sequences, 2048)}
    threads = torch.get_num_threads()
    print({"tokens_per_second": rates, "probe_over_plain": ratio, "model_gflops": model_gflops,
           "output_layer_gflops_at_rows": matmul_gflops, "sequences": sequences, "threads": threads})  # fmt: skip


def token_rows(batch, method: str, G: int) -> int:
    """Token rows a method's forwards compute: plain generate every row's prompt and every step until the
    longest response ends; the loop each prompt once, then one row per response per step after the first."""
    gen_lens = [n for lens in batch.gen_lens for n in lens]
    if method == "plain":
        return len(gen_lens) * (batch.sequences.shape[-1] - 1)
    return len(gen_lens) // G * batch.prompt_len + sum(n - 1 for n in gen_lens)


def output_layer_gflops(weight: torch.Tensor, rows: int, repeats: int = 10) -> dict[str, float]:
    """[rows, H] x [H, V] GFLOPS with torch's default kernel and with the loop's packed oneDNN one."""
    x = torch.randn(rows, weight.shape[1])
    layer = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    result = {}
    for kernel in ("torch_default", "onednn_packed"):
        with torch.no_grad(), packed_linears(layer, rows) if kernel == "onednn_packed" else nullcontext():
            layer(x)
            start = time.perf_counter()
            for _ in range(repeats):
                layer(x)
            result[kernel] = 2 * rows * weight.numel() * repeats / (time.perf_counter() - start) / 1e9
    return result


if __name__ == "__main__":
    CLI(main, as_positional=False)
