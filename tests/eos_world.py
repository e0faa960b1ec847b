"""A world with EOS: responses of 1 to T tokens, all enumerable, so every entropy target is exact.

Tokens: <pad>, <eos> and the digits 0-4. A response ends at its first <eos> or after T tokens. The
model's <eos> logit is raised so that lengths vary a lot (E|y| from 1.5 to 2.8 by prompt). Exact values
come from a plain float64 forward over every response, independent of the probe's code.
"""

import itertools
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = ["<pad>", "<eos>", "0", "1", "2", "3", "4"]
PAD, EOS = 0, 1
MAX_LEN = 3  # T: the generation budget


def eos_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )


def save_eos_world(folder: Path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # raise the EOS logit by ~1.5 along the mean final hidden state: E|y| from 1.5 to 2.8
        tokens = torch.randint(0, len(VOCAB), (16, 6), generator=torch.Generator().manual_seed(1))
        mean_hidden = model.model(input_ids=tokens).last_hidden_state.flatten(0, 1).mean(0)
        model.lm_head.weight[EOS] += 1.5 * mean_hidden / mean_hidden.norm() ** 2
    model.save_pretrained(folder)
    eos_tokenizer().save_pretrained(folder)
    return str(folder)


def all_responses() -> list[list[int]]:
    """Every response: k non-EOS tokens then EOS (k < T), or T non-EOS tokens."""
    others = [t for t in range(len(VOCAB)) if t != EOS]
    ended = [list(prefix) + [EOS] for k in range(MAX_LEN) for prefix in itertools.product(others, repeat=k)]
    return ended + [list(y) for y in itertools.product(others, repeat=MAX_LEN)]


def response_moments(model, tokenizer, question: str) -> tuple[torch.Tensor, ...]:
    """(E[Σ_t H_t], E[|y|], E[Σ_t H_t / |y|], E[-S(y) / |y|]) of one prompt, float64 scalars with the graph
    to the parameters."""
    prompt = tokenizer(question, add_special_tokens=False).input_ids
    total_entropy = expected_length = per_token = surprisal_per_token = 0.0
    responses = all_responses()
    for length in range(1, MAX_LEN + 1):
        group = torch.tensor([y for y in responses if len(y) == length])
        ids = torch.cat([torch.tensor(prompt).expand(len(group), -1), group], dim=1)
        logq = model(input_ids=ids).logits[:, len(prompt) - 1 : -1].double().log_softmax(-1)
        seq_logprobs = logq.gather(-1, group[..., None]).squeeze(-1).sum(-1)
        probability = seq_logprobs.exp()
        entropies = -(logq.exp() * logq).sum(-1).sum(-1)  # Σ_t H_t of each response
        total_entropy = total_entropy + (probability * entropies).sum()
        expected_length = expected_length + probability.sum() * length
        per_token = per_token + (probability * entropies).sum() / length
        surprisal_per_token = surprisal_per_token - (probability * seq_logprobs).sum() / length
    return total_entropy, expected_length, per_token, surprisal_per_token


def exact_targets(model, tokenizer, questions: list[str]) -> dict[str, tuple[float, list[torch.Tensor]]]:
    """Each entropy target over the prompts (uniform) and its gradient w.r.t. the trainable parameters.

    "surprisal_per_token" is E[-S/|y|]: what per_token_avg's naive estimator (−S for Σ_t H_t) is exact
    for. With lengths that depend on the tokens it is not E[Σ_t H_t / |y|]: E[−log q(y_t) | y_<t] = H_t,
    but 1/|y| depends on y_t and the tokens after it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    moments = [response_moments(model, tokenizer, q) for q in questions]
    total, length, per_token, surprisal = (torch.stack(column).mean() for column in zip(*moments))
    targets = {
        "budget": total / MAX_LEN, "per_token_avg": per_token, "token_mean": total / length,
        "surprisal_per_token": surprisal,
    }  # fmt: skip
    return {
        name: (value.item(), [g.double() for g in torch.autograd.grad(value, params, retain_graph=True)])
        for name, value in targets.items()
    }
