"""The SequenceProcessor's contract on tiny random models with the default model's real tokenizer."""

import copy
import io
from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_llama
from tqdm import tqdm

from probe_lightning import progress, token_scores
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import BatchedSequences, SequenceProcessor

PROMPTS = ["Hi", "What is 2 + 2? Think step by step and explain.", "Count to five"]


def make_processor(tokenizer, eos_scale=3.0, **settings) -> SequenceProcessor:
    return SequenceProcessor(tiny_llama(tokenizer, eos_scale=eos_scale), tokenizer, GenerationConfig(**settings))


def generate_with_scores(processor: SequenceProcessor, prompts, G) -> tuple[BatchedSequences, torch.Tensor]:
    """generate() itself, keeping its log q of each sampled token (transition scores), [B, G, R]."""
    encoded = processor.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = encoded.input_ids.repeat_interleave(G, 0), encoded.attention_mask.repeat_interleave(G, 0)
    hf_config = processor.config.to_hf()
    hf_config.update(output_scores=True, return_dict_in_generate=True)
    out = processor.model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_config)
    scores = processor.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    batch = processor.assemble(ids, mask, out.sequences[:, ids.shape[1] :], G)
    return batch, scores.view(len(prompts), G, -1)


def replace_config(processor: SequenceProcessor, **changes) -> SequenceProcessor:
    return SequenceProcessor(processor.model, processor.tokenizer, replace(processor.config, **changes))


def test_masks_and_gen_lens_with_pad_equal_to_eos_and_eos_mid_batch(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    processor = make_processor(tokenizer, max_new_tokens=16)
    batch = processor.generate_batched(PROMPTS, G=4, gen_batch_size=5)
    B, G, T = batch.sequences.shape
    P = batch.prompt_len
    assert (B, G) == (3, 4) and batch.prompt_lens == [P] * 3
    prompt_mask = tokenizer(PROMPTS, padding=True, return_tensors="pt", add_special_tokens=False).attention_mask
    assert torch.equal(batch.attention_masks[:, :, :P], prompt_mask[:, None, :].expand(B, G, P))
    gen_lens = torch.tensor(batch.gen_lens)
    assert (gen_lens < T - P).any() and (gen_lens == 16).any(), "the seed should give EOS mid-batch and full rows"
    for b in range(B):
        for g in range(G):
            n = batch.gen_lens[b][g]
            response = batch.sequences[b, g, P:]
            assert batch.attention_masks[b, g, P:].tolist() == [1] * n + [0] * (T - P - n)
            assert (response[: n - 1] != tokenizer.eos_token_id).all()
            if n < 16:
                assert response[n - 1] == tokenizer.eos_token_id
                assert (response[n:] == tokenizer.pad_token_id).all()


def test_teacher_forced_logprobs_equal_generation_scores(tokenizer):
    torch.manual_seed(1)
    processor = make_processor(tokenizer, max_new_tokens=12, temperature=0.7, top_p=0.8)
    batch, scores = generate_with_scores(processor, PROMPTS, G=3)
    tf = processor.teacher_force_logprobs(batch)
    mask = tf.response_mask.bool()
    assert mask.sum() > 30
    torch.testing.assert_close(tf.token_logprobs[mask], scores[:, :, : mask.shape[-1]][mask], atol=1e-4, rtol=0)
    assert torch.isfinite(tf.token_logprobs).all()
    lengths = torch.tensor(batch.gen_lens)
    assert (tf.seq_logprobs[lengths > 0] < 0).all()


def test_generate_batched_samples_from_q(tokenizer):
    """Every sampled token lies inside q's top-p set: its teacher-forced log-prob is finite."""
    torch.manual_seed(2)
    processor = make_processor(tokenizer, max_new_tokens=10, temperature=1.5, top_p=0.3)
    batch = processor.generate_batched(PROMPTS, G=4)
    tf = processor.teacher_force_logprobs(batch)
    assert torch.isfinite(tf.token_logprobs).all()
    assert (tf.token_logprobs <= 0).all()


def _brute_force_entropies(model, batch, temperature, top_p):
    """Entropy of q at every response position: full forward, float64, an explicit sort-based top-p."""
    B, G, T = batch.sequences.shape
    ids, masks = batch.sequences.view(B * G, T), batch.attention_masks.view(B * G, T)
    logits = model(input_ids=ids, attention_mask=masks, position_ids=(masks.cumsum(-1) - 1).clamp(min=0)).logits
    probs = (logits[:, batch.prompt_len - 1 : -1].double() / temperature).softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    q = probs * keep
    q = q / q.sum(-1, keepdim=True)
    entropies = -(q * q.clamp(min=1e-300).log()).sum(-1)
    return entropies.view(B, G, -1)


def test_token_entropies_equal_brute_force_over_the_vocabulary(tokenizer):
    torch.manual_seed(3)
    processor = make_processor(tokenizer, max_new_tokens=8, temperature=0.8, top_p=0.9)
    batch = processor.generate_batched(PROMPTS, G=2)
    tf = processor.teacher_force_logprobs(batch)
    with torch.no_grad():
        expected = _brute_force_entropies(processor.model, batch, 0.8, 0.9)
    mask = tf.response_mask.bool()
    torch.testing.assert_close(tf.token_entropies[mask].double(), expected[mask], atol=1e-4, rtol=1e-4)
    assert (tf.token_entropies[~mask] == 0).all()


def test_gradients_reach_parameters_only_with_grad(tokenizer):
    torch.manual_seed(4)
    processor = make_processor(tokenizer, max_new_tokens=6)
    batch = processor.generate_batched(PROMPTS[:2], G=2)
    without = processor.teacher_force_logprobs(batch, with_grad=False)
    assert not without.seq_logprobs.requires_grad
    with_grad = processor.teacher_force_logprobs(batch, with_grad=True)
    with_grad.seq_logprobs.sum().backward()
    grads = [p.grad for p in processor.model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    torch.testing.assert_close(with_grad.seq_logprobs.detach(), without.seq_logprobs)


def test_teacher_forcing_is_independent_of_chunking_and_left_padding(tokenizer):
    torch.manual_seed(5)
    processor = make_processor(tokenizer, max_new_tokens=8, temperature=0.9)
    batch = processor.generate_batched(PROMPTS, G=2)
    whole = processor.teacher_force_logprobs(batch)
    one_by_one = replace_config(processor, tf_batch_size=1).teacher_force_logprobs(batch)
    assert len(processor.microbatches(batch.num_prompts, 2)) == 1
    assert len(replace_config(processor, tf_batch_size=1).microbatches(batch.num_prompts, 2)) == len(PROMPTS)
    torch.testing.assert_close(whole.token_logprobs, one_by_one.token_logprobs, atol=1e-5, rtol=0)
    # The short prompt alone has no left padding; inside the batch it has a lot.
    alone = processor.assemble(
        batch.sequences[0, :, batch.prompt_len - 1 :].reshape(2, -1)[:, :1].clone(),
        torch.ones(2, 1, dtype=torch.long),
        batch.sequences[0, :, batch.prompt_len :],
        G=2,
    )
    short_prompt = tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    assert len(short_prompt) == 1, "PROMPTS[0] is one token, so the slice above is the whole prompt"
    torch.testing.assert_close(
        processor.teacher_force_logprobs(alone).token_logprobs, whole.token_logprobs[:1], atol=1e-5, rtol=0
    )


def test_generation_ends_after_a_stop_string(tokenizer):
    torch.manual_seed(6)
    stop_token = tokenizer.convert_tokens_to_ids("ing")
    model = tiny_llama(tokenizer)
    with torch.no_grad():
        model.lm_head.weight[stop_token] *= 3.0
    processor = SequenceProcessor(model, tokenizer, GenerationConfig(max_new_tokens=16, stop_strings=["ing"]))
    batch = processor.generate_batched(PROMPTS, G=3)
    P = batch.prompt_len
    ended = 0
    for b, g in [(b, g) for b in range(3) for g in range(3)]:
        n = batch.gen_lens[b][g]
        response = batch.sequences[b, g, P:].tolist()
        text = tokenizer.decode(response[:n])
        if "ing" in text:
            ended += 1
            assert text.endswith("ing") and "ing" not in tokenizer.decode(response[: n - 1])
            assert all(t == tokenizer.pad_token_id for t in response[n:])
        else:
            assert n == 16
    assert ended >= 3


def test_invalid_generation_settings_name_the_field():
    from probe_lightning.config import ProbeConfigError

    with pytest.raises(ProbeConfigError, match=r"generation.top_p must be in \(0, 1\], got 1.5"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ProbeConfigError, match="generation.temperature must be > 0, got 0"):
        GenerationConfig(temperature=0)


def test_with_grad_keeps_the_graph_even_inside_no_grad(tokenizer):
    """Lightning's predict loop runs under torch.no_grad; the probe's teacher forcing still needs a graph."""
    processor = make_processor(tokenizer, max_new_tokens=4)
    batch = processor.generate_batched(PROMPTS[:1], G=2)
    with torch.no_grad():
        scores = processor.teacher_force_logprobs(batch, with_grad=True)
    assert scores.seq_logprobs.requires_grad


def test_seeded_sampling_draws_each_response_from_its_own_seed_whatever_the_batch(tokenizer):
    processor = make_processor(tokenizer, max_new_tokens=8, temperature=0.9, top_p=0.8, gen_batch_size=3)
    seeds = list(range(100, 100 + len(PROMPTS) * 2))
    together = processor.generate_batched(PROMPTS, G=2, seeds=seeds)
    for b, prompt in enumerate(PROMPTS):
        alone = processor.generate_batched([prompt], G=2, seeds=seeds[2 * b : 2 * b + 2])
        for g in range(2):
            n = together.gen_lens[b][g]
            assert alone.gen_lens[0][g] == n
            P, P_alone = together.prompt_len, alone.prompt_len
            assert torch.equal(together.sequences[b, g, P : P + n], alone.sequences[0, g, P_alone : P_alone + n])
    assert processor.generate_batched(PROMPTS, G=2, seeds=seeds).responses_text == together.responses_text
    tf = processor.teacher_force_logprobs(together)
    assert torch.isfinite(tf.token_logprobs).all()  # inside q's top-p set


def _weighted_scores_gradient(model, tokenizer, config, batch) -> torch.Tensor:
    """∇ of Σ w·log q + Σ H_t, through teacher forcing (w fixed), flattened in float64."""
    tf = SequenceProcessor(model, tokenizer, config).teacher_force_logprobs(batch, with_grad=True)
    weights = torch.linspace(-1, 1, tf.token_logprobs.numel()).view_as(tf.token_logprobs)
    loss = (weights.to(tf.token_logprobs.dtype) * tf.token_logprobs).sum() + tf.token_entropies.sum()
    return torch.cat([g.flatten().double() for g in torch.autograd.grad(loss, list(model.parameters()))])


def test_teacher_forcing_gradients_are_within_float32_rounding_of_a_float64_copy(tokenizer):
    """float32 rounding alone puts a whole forward and backward of this model ~1e-5 (relative L2) from float64:
    measured 9.7e-6 on one CPU and 1.05e-5 on another, the same through the plain logits path. 3e-5 leaves
    room for other CPUs' kernels; a mistake in the chunked computation shows at 1e-3 and more."""
    processor = make_processor(tokenizer, max_new_tokens=12, temperature=0.9, top_p=0.95)
    batch = processor.generate_batched(PROMPTS, G=2, seeds=list(range(6)))
    single = _weighted_scores_gradient(processor.model, tokenizer, processor.config, batch)
    double = _weighted_scores_gradient(copy.deepcopy(processor.model).double(), tokenizer, processor.config, batch)
    assert ((single - double).norm() / double.norm()).item() < 3e-5


def test_teacher_forcing_keeps_no_vocabulary_sized_tensor_for_its_backward(tokenizer):
    processor = make_processor(tokenizer, max_new_tokens=12)
    batch = processor.generate_batched(PROMPTS, G=2, seeds=list(range(6)))
    weights = {p.data_ptr() for p in processor.model.parameters()}  # saving a parameter allocates nothing
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        processor.teacher_force_logprobs(batch, with_grad=True)
    logits = batch.num_sequences * batch.response_mask.shape[-1] * len(tokenizer)  # one microbatch's [N, R, V]
    assert max(saved) <= 0.25 * logits, f"a saved tensor of {max(saved)} elements, logits {logits}"


@pytest.mark.parametrize("budget_rows", [1, 5])
def test_teacher_forcing_logits_exist_a_bounded_chunk_of_positions_at_a_time(tokenizer, monkeypatch, budget_rows):
    """Whatever the sequences' length and the vocabulary, a chunk of logits (forward, and recomputed in the
    backward) holds at most _CHUNK_ELEMENTS of them, a whole number of positions."""
    processor = make_processor(tokenizer, max_new_tokens=12)
    batch = processor.generate_batched(PROMPTS, G=2, seeds=list(range(6)))
    vocabulary = len(tokenizer)
    monkeypatch.setattr(token_scores, "_CHUNK_ELEMENTS", budget_rows * vocabulary)
    shapes, logits = [], token_scores._logits

    def recorded(hidden, weight):
        z = logits(hidden, weight)
        shapes.append(z.shape)
        return z

    monkeypatch.setattr(token_scores, "_logits", recorded)
    tf = processor.teacher_force_logprobs(batch, with_grad=True)
    (tf.token_logprobs.sum() + tf.token_entropies.sum()).backward()
    positions = batch.num_sequences * batch.response_mask.shape[-1]
    assert max(shape.numel() for shape in shapes) == budget_rows * vocabulary
    assert sum(shape[0] for shape in shapes) == 2 * positions  # every position once forward, once backward


class _LogitsPath(SequenceProcessor):
    """Teacher forcing from the model's logits, as for an output layer that is not a plain linear map."""

    def _linear_head(self):
        return None


def test_the_hidden_state_path_gives_the_logits_path_numbers_with_temperature_and_top_p(tokenizer):
    processor = make_processor(tokenizer, max_new_tokens=10, temperature=0.7, top_p=0.8)
    batch = processor.generate_batched(PROMPTS, G=2, seeds=list(range(6)))
    hidden = processor.teacher_force_logprobs(batch)
    logits = _LogitsPath(processor.model, tokenizer, processor.config).teacher_force_logprobs(batch)
    torch.testing.assert_close(hidden.token_logprobs, logits.token_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.token_entropies, logits.token_entropies, atol=1e-5, rtol=0)
    single = _weighted_scores_gradient(processor.model, tokenizer, processor.config, batch)
    model, config = processor.model, processor.config
    tf = _LogitsPath(model, tokenizer, config).teacher_force_logprobs(batch, with_grad=True)
    weights = torch.linspace(-1, 1, tf.token_logprobs.numel()).view_as(tf.token_logprobs)
    loss = (weights * tf.token_logprobs).sum() + tf.token_entropies.sum()
    reference = torch.cat([g.flatten().double() for g in torch.autograd.grad(loss, list(model.parameters()))])
    assert ((single - reference).norm() / reference.norm()).item() < 1e-5


def test_sampling_shows_its_progress_sequence_by_sequence_with_its_token_rate(tokenizer, monkeypatch):
    """The bar of a long sampling phase counts every response once, when it ends, and every token drawn."""
    bars, tokens = [], []
    monkeypatch.setattr(
        progress, "phase_bar",
        lambda desc, unit, total=None, iterable=None: bars.append(tqdm(total=total, file=io.StringIO())) or bars[-1],
    )  # fmt: skip
    close = progress.SamplingProgress.close
    monkeypatch.setattr(progress.SamplingProgress, "close", lambda self: tokens.append(self.tokens) or close(self))
    processor = make_processor(tokenizer, max_new_tokens=8, gen_batch_size=4)  # several calls, some responses cut
    batch = processor.generate_batched(PROMPTS, G=2, seeds=list(range(6)))
    (bar,) = bars
    assert bar.n == bar.total == 6 and "tok/s" in bar.postfix
    assert tokens == [sum(map(sum, batch.gen_lens))]  # each response's tokens, its end included
