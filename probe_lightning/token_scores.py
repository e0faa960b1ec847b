"""log q(y_t) and the entropy of q at every response position, a few rows at a time: from the final hidden
states and the output layer (the logits exist one chunk at a time, and are recomputed in the backward),
or, for output layers that are not a plain linear map, from the logits.

q (docs/math.md) is softmax(z / temperature) then top-p truncation: transformers' own warpers, in
generate's order, so teacher forcing and generation always agree.
"""

from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch.autograd.function import once_differentiable
from transformers import LogitsProcessorList

_CHUNK_ELEMENTS = 3 << 20  # vocabulary-sized float32 work per chunk (12 MiB: 64 positions of a 49k vocabulary)


def token_scores(logits: torch.Tensor, targets: torch.Tensor, warper: LogitsProcessorList, with_grad: bool):
    """(log q(targets), entropies of q), [N, R] each, from [N, R, V] logits, both differentiable.

    with_grad: a custom backward that never keeps a vocabulary-sized tensor beyond the logits.
    Otherwise plain autograd ops, so forward-mode AD (the directional-derivative jvp) runs through them.
    """
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (logits.shape[1] * logits.shape[2]))
    if with_grad:
        return _TokenScores.apply(logits, targets, warper, rows_per_chunk)
    chunks = [_chunk_scores(z, y, warper) for z, y in _split(rows_per_chunk, logits, targets)]
    return torch.cat([lp for lp, _ in chunks]), torch.cat([ent for _, ent in chunks])


def head_token_scores(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, warper: LogitsProcessorList, with_grad: bool
):
    """As token_scores, from [N, R, H] final hidden states and the [V, H] output weight: no [N, R, V] logits
    are ever held, only a chunk of positions' logits of about _CHUNK_ELEMENTS, whatever N, R and V."""
    N, R = targets.shape
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    hidden, targets = hidden.reshape(N * R, hidden.shape[-1]), targets.reshape(N * R)
    if with_grad:
        logprobs, entropies = _HeadScores.apply(hidden, weight, targets, warper, rows_per_chunk)
    else:
        chunks = [_chunk_scores(_logits(h, weight), y, warper) for h, y in _split(rows_per_chunk, hidden, targets)]
        logprobs, entropies = torch.cat([lp for lp, _ in chunks]), torch.cat([ent for _, ent in chunks])
    return logprobs.view(N, R), entropies.view(N, R)


class _HeadScores(torch.autograd.Function):
    """(log q(y_t), H_t) from [M, H] hidden states and the output weight, chunk by chunk; backward recomputes each
    chunk's logits, so the only vocabulary-sized tensors are one chunk's. The weight's gradient goes into
    the sum registered for it (output_weight_gradients_into), if any: no [V, H] gradient beside the
    model's activations at the backward's peak."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, warper: LogitsProcessorList, rows_per_chunk: int):
        ctx.warper, ctx.rows_per_chunk, ctx.weight_id = warper, rows_per_chunk, id(weight)
        ctx.set_materialize_grads(False)
        chunks = [_chunk_scores(_logits(h, weight), y, warper) for h, y in _split(rows_per_chunk, hidden, targets)]
        entropies = torch.cat([ent for _, ent in chunks])
        ctx.save_for_backward(hidden, weight, targets, entropies)
        return torch.cat([lp for lp, _ in chunks]), entropies

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropies):
        hidden, weight, targets, entropies = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        wide = torch.promote_types(weight.dtype, torch.float32)
        with _WEIGHT_SINKS.get(ctx.weight_id) or nullcontext() as sink:
            grad_weight = None
            if ctx.needs_input_grad[1]:  # each chunk's share added in place: no [V, H] per chunk
                grad_weight = sink if sink is not None else torch.zeros_like(weight, dtype=wide)
            grads = _chunked_grads(ctx.rows_per_chunk, grad_logprobs, grad_entropies)
            chunks = _split(ctx.rows_per_chunk, hidden, targets, entropies, grad_hidden)
            for (h, y, entropy, out), (g, g_h) in zip(chunks, grads):
                with torch.no_grad():
                    z = _logits(h, weight).to(wide)
                grad_z = _logits_gradient(z, y, entropy, ctx.warper, g, g_h)
                out.copy_(grad_z.to(weight.dtype) @ weight)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_z.T, h.to(wide))
        if sink is not None or grad_weight is None:
            return grad_hidden, None, None, None, None
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


_WEIGHT_SINKS: dict[int, AbstractContextManager] = {}


@contextmanager
def output_weight_gradients_into(sinks: dict[torch.Tensor, AbstractContextManager]):
    """Within the block, head_token_scores' backward adds its output weight's gradient into the tensor that
    sinks[weight] yields on entering (entered once per backward, around the additions), chunk by chunk,
    and gives autograd none for it. Weights not in sinks get their gradient from autograd as usual."""
    _WEIGHT_SINKS.update({id(weight): sink for weight, sink in sinks.items()})
    try:
        yield
    finally:
        for weight in sinks:
            del _WEIGHT_SINKS[id(weight)]


class _TokenScores(torch.autograd.Function):
    """(log q(y_t), entropy H_t of q) at every position of [N, R, V] logits, rows_per_chunk rows at a time.

    Nothing vocabulary-sized is kept beyond the logits themselves: backward rebuilds q chunk by chunk,
    d log q(y) / d scores = onehot(y) − q and dH / d scores = −q (log q + H).
    """

    @staticmethod
    def forward(ctx, logits, targets, warper: LogitsProcessorList, rows_per_chunk: int):
        ctx.warper, ctx.rows_per_chunk = warper, rows_per_chunk
        ctx.set_materialize_grads(False)  # a None gradient for the entropies: the loss does not use them
        chunks = [_chunk_scores(z, y, warper) for z, y in _split(rows_per_chunk, logits, targets)]
        entropies = torch.cat([ent for _, ent in chunks])
        ctx.save_for_backward(logits, targets, entropies)
        return torch.cat([lp for lp, _ in chunks]), entropies

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropies):
        logits, targets, entropies = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        grads = _chunked_grads(ctx.rows_per_chunk, grad_logprobs, grad_entropies)
        chunks = _split(ctx.rows_per_chunk, logits, targets, entropies, grad_logits)
        for (z, y, entropy, out), (g, g_h) in zip(chunks, grads):
            out.copy_(_logits_gradient(z, y, entropy, ctx.warper, g, g_h))
        return grad_logits, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, R, H] @ [V, H]ᵀ as one 2-D matmul: torch.matmul picks its kernel by whether an input needs a
    gradient, which would make the same numbers differ in the last bit between the probe's passes."""
    return (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).view(*hidden.shape[:-1], weight.shape[0])


def _chunked_grads(rows: int, grad_logprobs: torch.Tensor | None, grad_entropies: torch.Tensor | None):
    """Per row chunk, (gradient of the log-probs, gradient of the entropies); None where the loss has none."""
    parts = [g.split(rows) if g is not None else None for g in (grad_logprobs, grad_entropies)]
    count = len(next(p for p in parts if p is not None))
    return [tuple(p[i] if p is not None else None for p in parts) for i in range(count)]


def _logits_gradient(z, targets, entropies, warper, grad_logprobs, grad_entropies) -> torch.Tensor:
    """d(Σ g·log q(y) + Σ g_H·H) / d z for one chunk of logits z (H: the forward's entropies), through the
    warper's own backward (temperature, top-p mask), if any."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(bool(warper))
        scores = _warp(z, warper)
    grad_scores = _grad_scores(scores.detach(), targets, entropies, grad_logprobs, grad_entropies)
    return torch.autograd.grad(scores, z, grad_scores)[0] if warper else grad_scores


def _grad_scores(scores, targets, entropies, grad_logprobs, grad_entropies) -> torch.Tensor:
    """d(Σ g·log q(y) + Σ g_H·H) / d scores: g (onehot(y) − q) − g_H q (log q + H).

    At most two vocabulary-sized buffers besides the scores (q, and log q, which becomes the gradient):
    the chunk's working set is what teacher forcing holds above the model."""
    q = scores.softmax(-1)
    if grad_entropies is None:
        grad = q.mul_(-grad_logprobs[..., None].to(scores.dtype))  # backward gets at least one gradient
    else:
        g_h = grad_entropies[..., None].to(scores.dtype)
        grad = scores.log_softmax(-1).add_(entropies[..., None].to(scores.dtype)).mul_(q).mul_(-g_h)
        grad.masked_fill_(q == 0, 0.0)  # outside the top-p set q = 0: its term is 0, not 0 · (−inf)
        if grad_logprobs is not None:
            grad.addcmul_(q, grad_logprobs[..., None].to(scores.dtype), value=-1.0)
    if grad_logprobs is not None:
        grad.scatter_add_(-1, targets[..., None], grad_logprobs[..., None].to(scores.dtype))
    return grad


def _split(rows: int, *tensors: torch.Tensor):
    """Row chunks of several tensors in step: views, so writing into a chunk writes into its tensor."""
    return zip(*(t.split(rows) for t in tensors))


def _warp(logits: torch.Tensor, warper: LogitsProcessorList) -> torch.Tensor:
    """The scores of q from [..., V] logits, in float32 or wider (transformers' warpers take [rows, V])."""
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return warper(None, scores.reshape(-1, scores.shape[-1])).view_as(scores) if warper else scores


def log_q_and_entropy(logits: torch.Tensor, warper: LogitsProcessorList) -> tuple[torch.Tensor, torch.Tensor]:
    """log q over the vocabulary, [..., V], and the entropy of q, [...], from [..., V] logits: what
    generation samples from and teacher forcing scores with. One vocabulary-sized buffer besides log q."""
    logq = _warp(logits, warper).log_softmax(-1)
    # Tokens outside the top-p set have q = 0, log q = -inf: their 0 * -inf = nan terms count as 0.
    return logq, -logq.exp().mul_(logq).nansum(-1)


def _chunk_scores(logits: torch.Tensor, targets: torch.Tensor, warper: LogitsProcessorList):
    """log q(target) and the entropy of q at each position, [N, R] from [N, R, V] logits."""
    logq, entropies = log_q_and_entropy(logits, warper)
    return logq.gather(-1, targets[..., None]).squeeze(-1), entropies
