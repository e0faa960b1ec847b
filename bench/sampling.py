"""What seeded sampling costs: plain `model.generate` sampling against the probe's per-response seeded
Gumbel-max sampling (the same distribution, independent of batch and process), same prompts and batch.

    python bench/sampling.py                 # default model, 32 sequences of up to 64 new tokens, 3 rounds

Both are timed alternately in one process; reported: new tokens per second and the ratio.
"""

import time

import torch
from jsonargparse import CLI

from probe_lightning.data import format_prompt
from probe_lightning.models import DEFAULT_MODEL, load_model_and_tokenizer
from probe_lightning.problems import arithmetic_problems
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor


def main(sequences: int = 32, max_new_tokens: int = 64, rounds: int = 3, G: int = 4):
    """
    Args:
        sequences: sequences per generate call (the default gen_batch_size).
        max_new_tokens: the generation budget.
        rounds: alternating (plain, seeded) pairs.
        G: responses per prompt.
    """
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    config = GenerationConfig(max_new_tokens=max_new_tokens, gen_batch_size=sequences, stop_strings=["</answer>"])
    processor = SequenceProcessor(model, tokenizer, config)
    prompts = [format_prompt(tokenizer, p.question) for p in arithmetic_problems(0)[: sequences // G]]
    seconds, tokens = {"plain": 0.0, "seeded": 0.0}, {"plain": 0, "seeded": 0}
    for round_ in range(rounds + 1):  # round 0 warms up, untimed
        for method in ("plain", "seeded") if round_ % 2 else ("seeded", "plain"):
            torch.manual_seed(round_)
            seeds = list(range(round_ * sequences, (round_ + 1) * sequences)) if method == "seeded" else None
            start = time.perf_counter()
            batch = processor.generate_batched(prompts, G, seeds=seeds)
            if round_:
                seconds[method] += time.perf_counter() - start
                tokens[method] += sum(sum(lens) for lens in batch.gen_lens)
    rates = {m: tokens[m] / seconds[m] for m in seconds}
    ratio = rates["seeded"] / rates["plain"]
    print({"tokens_per_second": rates, "seeded_over_plain": ratio, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    CLI(main, as_positional=False)
