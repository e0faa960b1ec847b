"""The probe's own sampling loop: G responses per prompt from q, each from its own seeded generator.

It samples what `model.generate` with the same SeededSampler samples (tests/test_decoding.py), doing less
work for it:
- each prompt is read once (one prefill per prompt, its KV cache repeated for the G responses);
- a response that has ended (EOS, or a stop string completed) leaves the batch, with its cache rows,
  instead of being fed padding until the longest response of the call ends;
- each step draws one uniform number per row (inverse CDF), not a vocabulary of Gumbel noise;
- it keeps log q of every drawn token and the entropy of q at every step, which teacher forcing would
  give to float precision (the token_mean plug-ins need them before the E batch's backward);
- on a CPU, its float32 linear layers multiply with oneDNN on weights packed once per call (packed_linears).
"""

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from probe_lightning.progress import SamplingProgress
from probe_lightning.sampling import SeededSampler
from probe_lightning.token_scores import log_q_and_entropy


@dataclass
class Decoded:
    """[N, R] per sampled sequence (prompt-major, G per prompt), R = the longest response of the call."""

    responses: torch.Tensor  # long: the drawn tokens, pad_token_id after each response's end
    token_logprobs: torch.Tensor  # float32: log q of each drawn token, 0 after the end
    token_entropies: torch.Tensor  # float32: the entropy of q at each step, 0 after the end


class ResponseEnds:
    """Whether each response has ended: its last token is an EOS, or it completes a stop string.

    A stop string is found in the concatenated text of the response's tokens, each decoded alone, the way
    SequenceProcessor.response_lengths finds it afterwards, so both end a response at the same token.
    """

    def __init__(self, tokenizer, eos_token_ids: list[int], stop_strings: list[str], num_rows: int):
        self.tokenizer, self.stop_strings = tokenizer, stop_strings
        self.eos = torch.tensor(eos_token_ids, dtype=torch.long)
        self.texts = [""] * num_rows

    def __call__(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[n] bool for the [n] tokens just drawn by `rows`."""
        ended = torch.isin(tokens, self.eos.to(tokens.device))
        if self.stop_strings:
            for i, (row, token) in enumerate(zip(rows.tolist(), tokens.tolist())):
                if self.completes_stop_string(row, token):
                    ended[i] = True
        return ended

    def completes_stop_string(self, row: int, token: int) -> bool:
        """Append `token` to row's text; whether the text now holds a stop string (the first time it does,
        this token completed it)."""
        self.texts[row] += self.tokenizer.decode([token])
        return any(s in self.texts[row] for s in self.stop_strings)


@contextmanager
def packed_linears(model: torch.nn.Module, rows: int):
    """For the duration, the model's float32 CPU nn.Linear layers multiply with oneDNN on a packed copy of their
    weights (what torch.compile's CPU freezing does), for inference only; elsewhere (and under CPU autocast,
    which casts nn.Linear's inputs itself) nothing changes.

    Why: torch's float32 CPU matmul is MKL's, which on AMD CPUs is slow: on this repository's 2-core AMD machine
    it reaches about 80-115 GFLOPS at a decoding step's few rows (165 at most), oneDNN about 345
    (bench/sampling.py).
    The products agree to float32 rounding (tests/test_decoding.py). rows: the rows a step multiplies, the
    packing's hint. The packed copies (one more copy of the linear weights) live only inside the block.
    """
    linears = [
        m for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]  # fmt: skip
    if not linears or not torch.backends.mkldnn.is_available() or torch.is_autocast_enabled("cpu"):
        yield
        return
    for linear in linears:
        linear.forward = _packed_forward(torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows),
                                         linear.bias)  # fmt: skip
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward  # back to nn.Linear.forward


def _packed_forward(packed_weight: torch.Tensor, bias: torch.Tensor | None):
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@torch.no_grad()
def decode(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    G: int,
    sampler: SeededSampler,
    warper: LogitsProcessorList,
    ends: ResponseEnds,
    max_new_tokens: int,
    pad_token_id: int,
    progress: SamplingProgress | None = None,
) -> Decoded:
    """G responses to each of the [B, P] left-padded prompts; sampler and ends have one row per response."""
    N, device = prompt_ids.shape[0] * G, prompt_ids.device
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)  # fmt: skip
    cache = getattr(out, cache_name)
    cache.batch_repeat_interleave(G)
    logits = out.logits[:, -1].repeat_interleave(G, 0)
    mask = prompt_mask.repeat_interleave(G, 0)
    next_position = mask.sum(-1)
    active = torch.arange(N, device=device)  # the rows still generating, in batch order
    responses = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    entropies = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    length = 0
    for step in range(max_new_tokens):
        log_q, entropy = log_q_and_entropy(logits, warper)  # q exactly as teacher forcing computes it
        tokens = sampler.draw(log_q.exp(), active)
        responses[active, step] = tokens
        logprobs[active, step] = log_q.gather(-1, tokens[:, None]).squeeze(-1).float()
        entropies[active, step] = entropy.float()
        length = step + 1
        going = ~ends(active, tokens)
        if progress is not None:
            progress.step(len(active), len(active) - int(going.sum()) if step + 1 < max_new_tokens else len(active))
        if step + 1 == max_new_tokens or not going.any():
            break
        if not going.all():  # ended responses leave the batch
            kept = going.nonzero().squeeze(-1)
            cache.batch_select_indices(kept)
            active, tokens, mask, next_position = active[kept], tokens[kept], mask[kept], next_position[kept]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
                       use_cache=True, **{cache_name: cache}).logits[:, -1]  # fmt: skip
        next_position = next_position + 1
    return Decoded(responses[:, :length], logprobs[:, :length], entropies[:, :length])
