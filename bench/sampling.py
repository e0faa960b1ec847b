"""The probe's sampling against plain `model.generate`: the probe's own loop (decoding.py: one prefill per
prompt, ended responses leave the batch, one seeded uniform per row and step) against generate's
multinomial sampling from the same q, same prompts, same sequences per call.

    python bench/sampling.py                 # default model, 32 sequences of up to 64 new tokens, 3 rounds

Both are timed alternately in one process; reported: new tokens per second (tokens of the responses,
up to their ends) and the ratio. On this 2-core CPU a decoding step streams every weight of the model
from memory, so a step costs about the same for 1 or 32 sequences; the loop saves the repeated prompt
reads, the steps of ended rows and generate's per-step overheads, not the weight streaming.
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
        rounds: alternating (plain, probe) pairs.
        G: responses per prompt.
    """
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    config = GenerationConfig(max_new_tokens=max_new_tokens, gen_batch_size=sequences, stop_strings=["</answer>"])
    processor = SequenceProcessor(model, tokenizer, config)
    prompts = [format_prompt(tokenizer, p.question) for p in arithmetic_problems(0)[: sequences // G]]
    seconds, tokens = {"plain": 0.0, "probe": 0.0}, {"plain": 0, "probe": 0}
    for round_ in range(rounds + 1):  # round 0 warms up, untimed
        for method in ("plain", "probe") if round_ % 2 else ("probe", "plain"):
            torch.manual_seed(round_)
            seeds = list(range(round_ * sequences, (round_ + 1) * sequences)) if method == "probe" else None
            start = time.perf_counter()
            batch = processor.generate_batched(prompts, G, seeds=seeds)
            if round_:
                seconds[method] += time.perf_counter() - start
                tokens[method] += sum(sum(lens) for lens in batch.gen_lens)
    rates = {m: tokens[m] / seconds[m] for m in seconds}
    ratio = rates["probe"] / rates["plain"]
    threads = torch.get_num_threads()
    print({"tokens_per_second": rates, "probe_over_plain": ratio, "sequences": sequences, "threads": threads})


if __name__ == "__main__":
    CLI(main, as_positional=False)
