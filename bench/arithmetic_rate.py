"""How often the default model solves the built-in arithmetic task, sampled as the probe samples it.

    python bench/arithmetic_rate.py --num_prompts 64 --samples 4

Prints the correct rate over all responses and the fraction of prompts with mixed outcomes
(some but not all samples correct: the prompts whose group advantages are not all zero).
"""

import time

import torch
from jsonargparse import CLI

from probe_lightning.data import format_prompt
from probe_lightning.models import load_model_and_tokenizer
from probe_lightning.problems import load_problems
from probe_lightning.rewards import correctness_reward


def main(num_prompts: int = 64, samples: int = 4, prompts_per_call: int = 16, seed: int = 0) -> None:
    model, tokenizer = load_model_and_tokenizer()
    model.eval()
    problems = load_problems("arithmetic", seed=seed)[:num_prompts]
    torch.manual_seed(seed)
    rewards = []  # [num_prompts][samples]
    start = time.perf_counter()
    for first in range(0, num_prompts, prompts_per_call):
        chunk = problems[first : first + prompts_per_call]
        prompts = [format_prompt(tokenizer, problem.question) for problem in chunk]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(
                **inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=64,
                num_return_sequences=samples, stop_strings=["</answer>"], tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        texts = tokenizer.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
        for i, problem in enumerate(chunk):
            responses = texts[i * samples : (i + 1) * samples]
            rewards.append([correctness_reward(text, problem.answer) for text in responses])
    correct = sum(map(sum, rewards)) / (num_prompts * samples)
    mixed = sum(0 < sum(r) < samples for r in rewards) / num_prompts
    print(f"{num_prompts} prompts x {samples} samples in {time.perf_counter() - start:.0f} s")
    print(f"correct rate: {correct:.3f}")
    print(f"mixed-outcome prompts: {mixed:.3f}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
