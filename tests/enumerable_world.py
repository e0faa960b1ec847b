"""A world small enough to enumerate: a 6-token vocabulary, fixed-length responses, exact answers.

Tokens: <pad> and the digits 0-4; no EOS, so every response has exactly T tokens and a prompt's
V**T responses can all be scored. The reward is the real one (correctness_reward): a response is
right when its last digit equals the prompt's answer, so rewards correlate with the sampled tokens.
Everything exact here is computed by a plain forward pass in float64, independent of the probe's code.
"""

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from probe_lightning.rewards import correctness_reward

VOCAB = ["<pad>", "0", "1", "2", "3", "4"]
RESPONSE_LEN = 3


def digit_tokenizer() -> PreTrainedTokenizerFast:
    model = WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token="<pad>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", padding_side="left")


def world_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def save_world(folder: Path, seed: int = 0) -> str:
    """The model and tokenizer as a local folder, loadable by name like any other model."""
    world_model(seed).save_pretrained(folder)
    digit_tokenizer().save_pretrained(folder)
    return str(folder)


@dataclass
class Prompt:
    question: str  # e.g. "1 2"
    answer: str  # e.g. "3"


PROMPTS = [Prompt("1 2", "3"), Prompt("4", "0"), Prompt("2 2 0", "4"), Prompt("3 1", "4")]


@dataclass
class ExactPrompt:
    """Exact quantities of one prompt, for fixed-length responses (normaliser L = T)."""

    entropy: float  # H(p) = E[-S(y)] / T
    entropy_grad: list[torch.Tensor]  # ∇H(p)
    reward_grad: list[torch.Tensor]  # ∇E[r | p] / T


def exact_prompt(model, tokenizer, prompt: Prompt, temperature: float = 1.0) -> ExactPrompt:
    params = [p for p in model.parameters() if p.requires_grad]
    prompt_ids = tokenizer(prompt.question, add_special_tokens=False).input_ids
    responses = torch.tensor(list(itertools.product(range(len(VOCAB)), repeat=RESPONSE_LEN)))
    ids = torch.cat([torch.tensor(prompt_ids).expand(len(responses), -1), responses], dim=1)
    logits = model(input_ids=ids).logits[:, len(prompt_ids) - 1 : -1].double() / temperature
    seq_logprobs = logits.log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1).sum(-1)
    probs = seq_logprobs.exp()
    rewards = torch.tensor(
        [correctness_reward(tokenizer.decode(r, skip_special_tokens=True), prompt.answer) for r in responses.tolist()],
        dtype=torch.float64,
    )
    entropy = -(probs * seq_logprobs).sum() / RESPONSE_LEN
    expected_reward = (probs * rewards).sum() / RESPONSE_LEN
    entropy_grad = torch.autograd.grad(entropy, params, retain_graph=True)
    reward_grad = torch.autograd.grad(expected_reward, params)
    return ExactPrompt(entropy.item(), [g.double() for g in entropy_grad], [g.double() for g in reward_grad])


def mean_grads(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(parts).mean(0) for parts in zip(*grads)]


def exact_delta_h1(
    entropy_prompts: list[ExactPrompt], update_prompts: list[ExactPrompt], G: int, learning_rate: float, preconditioner=None
) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """η ⟨mean_E ∇H, P mean_U E[∇J]⟩ with E[∇J(p)] = (1 - 1/G) ∇E[r|p] / T; also returns ∇H̄ and E[Ȳ]."""
    grad_h = mean_grads([p.entropy_grad for p in entropy_prompts])
    expected_y = [(1 - 1 / G) * g for g in mean_grads([p.reward_grad for p in update_prompts])]
    if preconditioner is not None:
        expected_y = [p.double() * y for p, y in zip(preconditioner, expected_y)]
    value = learning_rate * sum(torch.dot(a.flatten(), b.flatten()).item() for a, b in zip(grad_h, expected_y))
    return value, grad_h, expected_y
