"""The probe's own sampling loop (decoding.py) samples what model.generate samples, and scores it as teacher
forcing does."""

import pytest
import torch
from tiny_models import tiny_llama

from probe_lightning.decoding import packed_linears
from probe_lightning.sampling import GenerationConfig, SeededSampler
from probe_lightning.sequence_processor import SequenceProcessor

PROMPTS = ["Hi", "What is 2 + 2? Think step by step and explain.", "Count to five"]


def make_processor(tokenizer, **settings) -> SequenceProcessor:
    return SequenceProcessor(tiny_llama(tokenizer, eos_scale=3.0), tokenizer, GenerationConfig(**settings))


def generate_with_the_same_sampler(processor: SequenceProcessor, G: int, seeds: list[int]) -> torch.Tensor:
    """model.generate with SeededSampler as its logits processor, every row of every prompt in one call."""
    encoded = processor.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = encoded.input_ids.repeat_interleave(G, 0), encoded.attention_mask.repeat_interleave(G, 0)
    return processor.sample(ids, mask, seeds=seeds)[:, ids.shape[1] :]


def test_the_loop_draws_the_tokens_generate_draws_with_the_same_seeds(tokenizer):
    """Prefill once per prompt, ended responses leaving the batch, stop strings: the same responses as
    generate, whose batch keeps every row to the end."""
    processor = make_processor(
        tokenizer, max_new_tokens=14, temperature=0.8, top_p=0.9, gen_batch_size=4, stop_strings=["e"]
    )
    G, seeds = 3, list(range(500, 509))
    loop = processor.generate_batched(PROMPTS, G, seeds=seeds)
    generated = generate_with_the_same_sampler(processor, G, seeds)
    lengths = processor.response_lengths(generated)
    gen_lens = torch.tensor(loop.gen_lens).flatten()
    assert torch.equal(gen_lens, lengths)
    assert (gen_lens < 14).any() and len(set(gen_lens.tolist())) > 2, "some responses should end early"
    stopped = [text for texts in loop.responses_text for text in texts if text.endswith("e")]
    assert stopped, "some responses should end on the stop string"
    responses = loop.sequences[:, :, loop.prompt_len :].flatten(0, 1)
    for row, n in enumerate(gen_lens.tolist()):
        assert torch.equal(responses[row, :n], generated[row, :n])
        assert (responses[row, n:] == tokenizer.pad_token_id).all()


def test_generation_scores_equal_teacher_forcing_with_temperature_and_top_p(tokenizer):
    processor = make_processor(tokenizer, max_new_tokens=12, temperature=0.7, top_p=0.8)
    batch = processor.generate_batched(PROMPTS, G=3, seeds=list(range(9)))
    tf = processor.teacher_force_logprobs(batch)
    mask = tf.response_mask.bool()
    assert mask.sum() > 30 and batch.token_logprobs.shape == tf.token_logprobs.shape
    torch.testing.assert_close(batch.token_logprobs, tf.token_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.token_entropies, tf.token_entropies, atol=1e-5, rtol=0)
    assert (batch.token_entropies[~mask] == 0).all() and (batch.token_entropies[mask] > 0).any()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_packed_linears_multiply_as_nn_linear_does_and_leave_the_model_as_it_was(tokenizer):
    model = tiny_llama(tokenizer)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids.repeat(3, 1)
    with torch.no_grad():
        stock = model(ids).logits
        with packed_linears(model, rows=3):
            assert all("forward" in vars(linear) for linear in linears)  # every layer multiplies with oneDNN
            packed = model(ids).logits
        after = model(ids).logits
    assert not any("forward" in vars(linear) for linear in linears)
    torch.testing.assert_close(packed, stock, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, stock)


def test_packed_linears_leave_float64_models_and_autocast_alone(tokenizer):
    model = tiny_llama(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(model, rows=3):
        assert not any("forward" in vars(m) for m in model.modules())
    with packed_linears(model.double(), rows=3):
        assert not any("forward" in vars(m) for m in model.modules())


def test_the_sampler_draws_from_q():
    """4,000 rows, one draw each, against q's probabilities (chi-square); q = 0 is never drawn."""
    q = torch.tensor([[1.0, 0.2, -0.5, 2.0, float("-inf")]]).softmax(-1)
    sampler = SeededSampler(list(range(4000)), torch.device("cpu"))
    picks = sampler.draw(q.expand(4000, -1), torch.arange(4000))
    counts = torch.bincount(picks, minlength=5).double()
    assert counts[4] == 0
    expected = 4000 * q[0, :4].double()
    chi_square = ((counts[:4] - expected) ** 2 / expected).sum().item()
    assert chi_square < 16.3  # 3 degrees of freedom, p = 0.001


def test_a_row_draws_the_same_numbers_whatever_the_other_rows():
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).expand(3, -1)
    together = SeededSampler([7, 8, 9], torch.device("cpu"))
    alone = SeededSampler([8], torch.device("cpu"))
    first = [together.draw(q, torch.arange(3))[1] for _ in range(20)]
    assert first == [alone.draw(q[:1], torch.tensor([0]))[0] for _ in range(20)]


def test_a_uniform_at_the_top_of_the_mass_draws_the_last_possible_token(monkeypatch):
    q = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor([1.0], dtype=torch.float64))
    assert SeededSampler([0], torch.device("cpu")).draw(q, torch.tensor([0])).tolist() == [1]
