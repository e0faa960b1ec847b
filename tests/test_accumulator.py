"""ProbeSums.add_gradient: backward adds the loss's gradient into the sums, the output layer's weight gradient
straight into its sum (no [V, H] gradient beside the activations), and its dot products with directions."""

import pytest
import torch
from tiny_models import tiny_llama

from probe_lightning import accumulator
from probe_lightning.accumulator import ProbeSums
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor

PROMPTS = ["Hi", "What is 2 + 2? Think step by step and explain."]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_add_gradient_adds_the_gradient_and_its_dot_products_with_directions(tokenizer, tied, monkeypatch):
    model = tiny_llama(tokenizer, eos_scale=3.0).double()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    processor = SequenceProcessor(model, tokenizer, GenerationConfig(max_new_tokens=8, temperature=0.8))
    batch = processor.generate_batched(PROMPTS, G=2, seeds=list(range(4)))
    weights = torch.linspace(-1, 1, batch.response_mask.numel(), dtype=torch.float64).view(batch.response_mask.shape)

    def loss():
        tf = processor.teacher_force_logprobs(batch, with_grad=True)
        return (weights * tf.token_logprobs).sum() + tf.token_entropies.sum()

    named = list(model.named_parameters())
    params = [p for _, p in named]
    expected = torch.autograd.grad(loss(), params)
    sums = ProbeSums(named)
    torch.manual_seed(0)
    start = [torch.randn_like(total) for total in sums.sum_x]  # sums that already hold other prompts
    for total, value in zip(sums.sum_x, start):
        total.copy_(value)
    directions = [[torch.randn_like(p) for p in params] for _ in range(2)]
    entered = []
    enter = accumulator._IntoSum.__enter__
    monkeypatch.setattr(accumulator._IntoSum, "__enter__", lambda self: entered.append(self) or enter(self))

    along = sums.add_gradient(sums.sum_x, loss(), directions)

    head = next(i for i, p in enumerate(params) if p is model.lm_head.weight)
    assert [sink.total is sums.sum_x[head] for sink in entered] == [True]  # entered once, for the output layer
    for total, value, grad in zip(sums.sum_x, start, expected):
        torch.testing.assert_close(total - value, grad, rtol=1e-9, atol=1e-12)
    for per_param, direction in zip(along, directions, strict=True):  # each parameter's term, and their sum
        dots = [torch.vdot(g.flatten(), d.flatten()).item() for g, d in zip(expected, direction)]
        assert per_param.tolist() == pytest.approx(dots, rel=1e-9, abs=1e-12)
        assert per_param.sum().item() == pytest.approx(sum(dots), rel=1e-9)
    assert all(p.grad is None for p in params)
    unkept = [total.clone() for total in sums.sum_x]
    assert torch.equal(sums.add_gradient(None, loss(), directions), along)  # only dotted; whatever the sums held
    assert all(torch.equal(a, b) for a, b in zip(sums.sum_x, unkept)) and all(p.grad is None for p in params)
