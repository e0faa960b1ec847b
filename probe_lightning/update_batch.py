"""The U batch's token coefficients in the trainer's step, and the U batch held whole when they need all of it.

Without the options below, a token's coefficient needs only its prompt, up to batch-level scalars the probe
applies when it ends (Probe._batch_scale). TRL's entropy mask keeps the tokens above a quantile of the whole
batch's entropies, its entropy bonus is a mean over the tokens it acts on, mask_truncated_completions takes
truncated completions out of the token count, and the KL term needs the reference model's log-probs
(docs/math.md §5). With any of them (TrainerSettings.needs_whole_batch) the probe holds the U rollouts until its
end, as it holds the E rollouts; then `prepare` gathers the counts of the whole batch (all processes), and every
token's coefficient is exact when its microbatch is teacher-forced, so the per-prompt pieces of ∇J̄ still add up.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from probe_lightning.config import ProbeConfigError, require
from probe_lightning.models import load_model_and_tokenizer
from probe_lightning.rollout import Rollout
from probe_lightning.sequence_processor import BatchedSequences, SequenceProcessor
from probe_lightning.settings import ProbeSettings
from probe_lightning.trainer_loss import (
    STD_EPS,
    TOKEN_COUNT_LOSSES,
    TrainerSettings,
    entropy_threshold,
    one_local_batch,
    trainer_coefficients,
    truncated_completions,
)


@dataclass
class StepCounts:
    """What the step's coefficients need from the whole U batch, all processes."""

    prompts: int  # B_U
    sequences: int  # N_seq
    tokens: int  # Σ loss mask: TRL's num_items_in_batch
    bonus_tokens: int  # Σ loss mask · entropy mask: the entropy bonus's normaliser
    threshold: float | None  # top_entropy_quantile's entropy threshold; None: every token in the policy term
    advantage_scale: float  # scale_rewards batch: 1 / (std of the batch's rewards + 1e-4); else 1


class ReferencePolicy:
    """TRL's reference model for the KL term, scoring the U responses under softmax(z/τ) (top-p is 1 with a KL
    term): a model loaded from a path (full fine-tuning: the initial model), the policy with its LoRA adapter
    disabled, or the policy itself (no checkpoint: the probed model is the initial one)."""

    def __init__(self, processor: SequenceProcessor, reference: str | None):
        self.policy = processor
        self.processor: SequenceProcessor | None = None  # a loaded reference model's
        if reference is not None:
            try:
                model, _ = load_model_and_tokenizer(reference, dtype=next(processor.model.parameters()).dtype)
            except FileNotFoundError as err:
                raise ProbeConfigError(f"model.reference {reference!r} does not load: {err}") from err
            vocabulary, policy_vocabulary = model.config.vocab_size, processor.model.config.vocab_size
            require(
                vocabulary == policy_vocabulary,
                f"model.reference {reference!r} has a vocabulary of {vocabulary} tokens and the policy "
                f"{policy_vocabulary}: the reference must be the model the policy was fine-tuned from",
            )
            model.requires_grad_(False)
            self.processor = SequenceProcessor(model.eval().to(processor.device), processor.tokenizer, processor.config)

    def token_logprobs(self, batch: BatchedSequences) -> torch.Tensor:
        """[B, G, R] log π_ref(y_t), 0 off the response mask."""
        if self.processor is not None:
            return self.processor.teacher_force_logprobs(batch).token_logprobs
        model = self.policy.model
        if _is_peft(model):
            with model.disable_adapter():
                return self.policy.teacher_force_logprobs(batch).token_logprobs
        return self.policy.teacher_force_logprobs(batch).token_logprobs


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel  # only LoRA checkpoints need peft
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class UpdateBatch:
    """One probe's U batch in the trainer's step: each token's coefficients; the rollouts, held when the options
    need the whole batch (`holds`), with each prompt's masks and reference log-probs."""

    def __init__(self, processor: SequenceProcessor, settings: ProbeSettings):
        trainer = settings.trainer_settings
        self.trainer: TrainerSettings = one_local_batch(trainer)  # the loss the coefficients follow
        self.holds = trainer.needs_whole_batch
        self.G = settings.G
        self.eos_token_ids, self.pad_token_id = processor.config.eos_token_ids, processor.config.pad_token_id
        self.reference = ReferencePolicy(processor, settings.reference) if trainer.beta else None
        self.held: list[tuple[Rollout, torch.Tensor]] = []  # each with the entropies its selection uses
        self.counts: StepCounts | None = None
        # The last prepared batch's per-prompt [G, R] tensors, by prompt id: TRL's loss mask, its entropy mask,
        # the reference's log-probs (scored when the prompt is first teacher-forced).
        self.loss_masks: dict[int, torch.Tensor] = {}
        self.entropy_masks: dict[int, torch.Tensor] = {}
        self.reference_logprobs: dict[int, torch.Tensor] = {}

    def hold(self, rollout: Rollout, token_entropies: torch.Tensor) -> None:
        """A U rollout with its entropies H_t (generation's, else teacher forcing's): the entropy mask's."""
        self.held.append((rollout, token_entropies))

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """[B, G, R] TRL's loss mask: the response tokens, none of a truncated completion's with
        mask_truncated_completions (its last token neither EOS nor pad)."""
        batch = rollout.batch
        mask = batch.response_mask.float()
        if not self.trainer.mask_truncated_completions:
            return mask
        lengths = torch.tensor(batch.gen_lens, device=batch.sequences.device)
        last = batch.sequences.gather(-1, (batch.prompt_len + lengths - 1).clamp(min=0)[..., None]).squeeze(-1)
        return mask * ~truncated_completions(last, self.eos_token_ids, self.pad_token_id)[..., None]

    def prepare(self, gather: Callable[[object], list]) -> list[Rollout]:
        """The held rollouts, to be teacher-forced into ΣY, once the whole batch's counts are known: every
        process calls this (gather: Collectives.gather), whose shares make one batch."""
        held, self.held = self.held, []
        masks = [self.loss_mask(rollout) for rollout, _ in held]
        entropies = [h for _, h in held]
        local = (
            torch.cat([h[mask.bool()].cpu() for h, mask in zip(entropies, masks)] or [torch.zeros(0)]).double(),
            torch.cat([r.rewards[~r.rewards.isnan()].cpu() for r, _ in held] or [torch.zeros(0)]).double(),
            sum(r.batch.num_prompts for r, _ in held),
        )
        shares = gather(local)
        token_entropies = torch.cat([share[0] for share in shares])
        rewards = torch.cat([share[1] for share in shares])
        prompts = sum(share[2] for share in shares)
        trainer, G = self.trainer, self.G
        threshold = None
        if trainer.top_entropy_quantile < 1:
            threshold = entropy_threshold(token_entropies, trainer.top_entropy_quantile)
        scale = 1.0
        if trainer.scale_rewards == "batch" and G > 1:  # the rollouts carry r − mean r (RolloutMaker)
            scale = 1.0 / (rewards.std().item() + STD_EPS)
        kept = int((token_entropies >= threshold).sum()) if threshold is not None else len(token_entropies)
        self.counts = StepCounts(prompts, prompts * G, len(token_entropies), kept, threshold, scale)
        self.loss_masks, self.entropy_masks, self.reference_logprobs = {}, {}, {}
        for (rollout, _), mask, h in zip(held, masks, entropies):
            for b, prompt_id in enumerate(rollout.prompt_ids):
                self.loss_masks[prompt_id] = mask[b]
                if threshold is not None:
                    self.entropy_masks[prompt_id] = (h[b] >= threshold) & mask[b].bool()
        return [rollout for rollout, _ in held]

    def coefficients(
        self, rollout: Rollout, token_logprobs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(c, c_H) [B, G, R] of a U microbatch: prompt p's piece of ∇J̄ is ∇(Σ c log q(y_t) + Σ c_H H_t), up to
        the probe's update_scale; c_H (the entropy bonus's) None without a bonus. A held batch's are exact, every
        batch-level factor included (B_U times the step's, as the probe divides ΣY by B_U; update_scale is the
        clip factor only). token_logprobs: log q at θ, the KL term's (with beta != 0)."""
        return self._coefficients(self.trainer, rollout, token_logprobs)

    def bonus_coefficients(self, rollout: Rollout) -> torch.Tensor:
        """[B, G, R] the entropy bonus's c_H per unit entropy_coef (TRL's loss type; not "seed", which has no bonus):
        prompt p's piece of g_b, the bonus's gradient at coefficient 1, is ∇ Σ c_H H_t, up to the probe's bonus_scale.
        A held batch's are exact (m_eff / Σ m_eff, times B_U); otherwise the mask, Σ m being applied at the end."""
        unit = replace(self.trainer, entropy_coef=1.0, use_adaptive_entropy=False, beta=0.0)
        return self._coefficients(unit, rollout, None)[1]

    def _coefficients(
        self, trainer: TrainerSettings, rollout: Rollout, token_logprobs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.holds:
            return self._whole_batch_coefficients(trainer, rollout, token_logprobs)
        mask = rollout.batch.response_mask.float()
        G = rollout.batch.num_responses_per_prompt
        if trainer.loss_type == "seed":
            return (rollout.advantages / rollout.max_lengths[:, None] / G)[..., None] * mask, None
        # The token-count losses divide by the U batch's token count, and so does the bonus (without a held batch
        # its tokens are the loss mask's): 1 here, the count in the probe's update_scale and bonus_scale.
        return trainer_coefficients(
            trainer, rollout.advantages, mask, max_lengths=rollout.max_lengths, num_sequences=G,
            num_tokens=1.0 if trainer.loss_type in TOKEN_COUNT_LOSSES else None, bonus_tokens=1.0,
        )  # fmt: skip

    def _whole_batch_coefficients(
        self, trainer: TrainerSettings, rollout: Rollout, token_logprobs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        counts, ids = self.counts, rollout.prompt_ids
        keep = torch.stack([self.entropy_masks[i] for i in ids]) if counts.threshold is not None else None
        c, c_h = trainer_coefficients(
            trainer, rollout.advantages * counts.advantage_scale, torch.stack([self.loss_masks[i] for i in ids]),
            num_sequences=counts.sequences, num_tokens=counts.tokens, keep=keep, token_logprobs=token_logprobs,
            ref_logprobs=self._reference_logprobs(rollout) if trainer.beta else None,
            bonus_tokens=counts.bonus_tokens,
        )  # fmt: skip
        return c * counts.prompts, None if c_h is None else c_h * counts.prompts

    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """[B, G, R] the reference's log-probs of the rollout's responses, scored once per prompt."""
        if any(i not in self.reference_logprobs for i in rollout.prompt_ids):
            scored = self.reference.token_logprobs(rollout.batch)
            self.reference_logprobs.update(zip(rollout.prompt_ids, scored))
        return torch.stack([self.reference_logprobs[i] for i in rollout.prompt_ids])
