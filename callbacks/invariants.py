"""BatchInvariants: check every rollout against the batch contract before any of it reaches the sums."""

import lightning.pytorch as pl
import torch

from probe_lightning.rollout import Rollout
from probe_lightning.sequence_processor import TeacherForcing


class InvariantViolation(RuntimeError):
    """A rollout broke the batch contract; the message names the check and the values."""


def _check(condition: bool, name: str, detail: str) -> None:
    if not condition:
        raise InvariantViolation(f"batch invariant '{name}' failed: {detail}")


def check_rollout(rollout: Rollout, G: int) -> None:
    """The batch contract (docs/math.md, the SequenceProcessor) on one rollout; raises InvariantViolation.

    G: the responses per prompt that were asked for.
    """
    batch = rollout.batch
    _check(
        batch.num_prompts == len(rollout.prompts.questions),
        "num_prompts",
        f"{batch.num_prompts} rollouts for {len(rollout.prompts.questions)} prompts",
    )
    _check(
        batch.num_responses_per_prompt == G,
        "num_responses_per_prompt",
        f"{batch.num_responses_per_prompt} responses per prompt, expected G={G}",
    )
    sequences, masks = batch.sequences, batch.attention_masks
    _check(sequences.dim() == 3, "sequences_shape", f"sequences must be [B, G, T], got {tuple(sequences.shape)}")
    B, G, T = sequences.shape
    _check(sequences.dtype == torch.long, "sequences_dtype", f"sequences must be long, got {sequences.dtype}")
    _check(masks.shape == sequences.shape, "mask_shape", f"attention_masks {tuple(masks.shape)} != {(B, G, T)}")
    _check(bool(((masks == 0) | (masks == 1)).all()), "mask_binary", "attention_masks holds values other than 0/1")
    _check(len(batch.prompt_lens) == B, "prompt_lens_count", f"{len(batch.prompt_lens)} prompt_lens for B={B}")
    _check(len(set(batch.prompt_lens)) == 1, "prompt_lens_constant", f"prompt_lens differ: {batch.prompt_lens}")
    P = batch.prompt_lens[0]
    _check(0 < P < T, "prompt_len_range", f"prompt_len {P} not in (0, T={T})")
    prompt_mask = masks[:, :, :P]
    _check(bool(prompt_mask[:, :, -1].all()), "prompt_mask_left_padded", "the last prompt token is masked")
    _check(bool((prompt_mask.diff(dim=-1) >= 0).all()), "prompt_mask_left_padded", "padding inside a prompt")
    gen_lens = torch.tensor(batch.gen_lens, device=sequences.device)
    _check(tuple(gen_lens.shape) == (B, G), "gen_lens_shape", f"gen_lens {tuple(gen_lens.shape)} != {(B, G)}")
    expected = (torch.arange(T - P, device=sequences.device) < gen_lens[..., None]).to(masks.dtype)
    bad = (masks[:, :, P:] != expected).any(-1).nonzero()
    _check(len(bad) == 0, "response_mask", f"response mask != gen_lens for (prompt, response) {bad[:3].tolist()}")
    padding = sequences[:, :, P:][expected == 0]
    ended_ok = bool((padding == batch.pad_token_id).all())
    _check(ended_ok, "padding_after_response", "non-pad tokens after a response ended")
    _check(tuple(rollout.advantages.shape) == (B, G), "advantages_shape", f"{tuple(rollout.advantages.shape)}")
    _check(bool(torch.isfinite(rollout.advantages).all()), "advantages_finite", "non-finite advantage")
    means = rollout.advantages.mean(dim=1).abs().max().item()
    _check(means < 1e-5, "advantages_zero_mean", f"per-prompt advantage mean up to {means:.3g}, expected 0")
    _check(bool((rollout.max_lengths >= 1).all()), "max_lengths_positive", f"max_lengths {rollout.max_lengths}")
    if rollout.use_sequence_processor:
        wanted = gen_lens.max(dim=1).values.clamp(min=1).to(rollout.max_lengths)
        _check(
            torch.equal(rollout.max_lengths, wanted),
            "max_lengths_match_gen_lens",
            f"max_lengths {rollout.max_lengths.tolist()} != max(gen_lens) {wanted.tolist()}",
        )


def check_scores(rollout: Rollout, scores: TeacherForcing) -> None:
    """Teacher-forced log-probs of a rollout (a microbatch of one) before its gradient is used."""
    seq_logprobs, token_entropies = scores.seq_logprobs.detach(), scores.token_entropies
    gen_lens = rollout.gen_lens
    _check(bool(torch.isfinite(seq_logprobs).all()), "seq_logprobs_finite", f"S = {seq_logprobs.tolist()}")
    _check(bool((seq_logprobs <= 0).all()), "seq_logprobs_nonpositive", f"S = {seq_logprobs.tolist()}")
    # S = 0 only when q put all its mass on every sampled token, i.e. every token entropy is 0.
    uncertain = (token_entropies > 1e-6).any(-1) & (gen_lens > 0)
    zero = (seq_logprobs == 0) & uncertain
    _check(not bool(zero.any()), "seq_logprobs_nonzero", f"S = 0 for non-empty responses {zero.nonzero().tolist()}")


class BatchInvariants(pl.Callback):
    """Stops the run at the first rollout that breaks the batch contract, before it reaches the sums."""

    def setup(self, trainer, pl_module, stage):
        pl_module.add_rollout_check(self)

    def check_rollout(self, rollout: Rollout, G: int) -> None:
        check_rollout(rollout, G)

    def check_scores(self, rollout: Rollout, scores: TeacherForcing) -> None:
        check_scores(rollout, scores)
