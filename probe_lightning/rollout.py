"""Rollouts: a prompt batch's sampled, scored responses, as the batch contract the estimators read.

`RolloutMaker` is the one place that makes them, for both generation paths:
- the SequenceProcessor path (default): batched generation, lengths and masks straight from it;
- the seed's legacy path: one model.generate(num_return_sequences=G) per rollout batch, L_max from
  re-tokenised text (kept to reproduce the seed's numbers).
A replayed batch (data.rollouts) brings its saved responses; they are scored exactly as fresh ones.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch

from probe_lightning.config import ScaleRewards, require
from probe_lightning.data import PromptBatch, format_prompt
from probe_lightning.rewards import correctness_reward
from probe_lightning.sequence_processor import BatchedSequences, SequenceProcessor
from probe_lightning.trainer_loss import advantages


@dataclass
class Rollout:
    """The B prompts of one PromptBatch, G scored responses each."""

    prompts: PromptBatch
    batch: BatchedSequences
    rewards: torch.Tensor  # [B, G] float32
    advantages: torch.Tensor  # [B, G] A_g = r_g - mean r, divided by the group's std + 1e-4 if scale_rewards group
    max_lengths: torch.Tensor  # [B] float32 L_max(p) >= 1
    use_sequence_processor: bool

    @property
    def role(self) -> str:
        return self.prompts.role

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts.prompt_ids

    @property
    def gen_lens(self) -> torch.Tensor:
        """[B, G] float32, on the sequences' device."""
        return torch.tensor(self.batch.gen_lens, dtype=torch.float32, device=self.batch.sequences.device)

    def select(self, prompts: slice) -> "Rollout":
        return Rollout(
            prompts=self.prompts.select(prompts),
            batch=self.batch.select(prompts),
            rewards=self.rewards[prompts],
            advantages=self.advantages[prompts],
            max_lengths=self.max_lengths[prompts],
            use_sequence_processor=self.use_sequence_processor,
        )


def sample_seed(prompts: PromptBatch, prompt_id: int, response: int) -> int:
    """The seed of one response's generator: (data seed, probe, role, prompt id, response index), so the
    same config samples the same responses on any number of processes and in any batch."""
    entropy = [prompts.seed, prompts.probe_index, "EVU".index(prompts.role), prompt_id, response]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class RolloutMaker:
    """PromptBatch -> Rollout: chat-formatted prompts, G samples each from q, rewards, advantages.

    scale_rewards "batch" divides by the whole U batch's reward std, known only when the probe ends:
    its rollouts carry r - mean r and the probe applies the factor to ∇J̄.
    """

    def __init__(
        self, processor: SequenceProcessor, use_sequence_processor: bool, G: int, G_E: int, scale_rewards: ScaleRewards
    ):
        self.processor = processor
        self.use_sequence_processor = use_sequence_processor
        self.G, self.G_E = G, G_E
        self.scale_rewards = "group" if scale_rewards == "group" else "none"

    def num_samples(self, role: str) -> int:
        """G for update prompts, G_E for entropy and evaluation prompts."""
        return self.G if role == "U" else self.G_E

    def __call__(self, prompts: PromptBatch) -> Rollout:
        batch = self._generate(prompts) if prompts.replay is None else self._on_device(prompts.replay)
        if self.use_sequence_processor:
            max_lengths = torch.tensor([max(max(lens), 1) for lens in batch.gen_lens])  # L_max = max_g gen_len_g
        else:
            max_lengths = self._retokenised_max_lengths(batch)
        device = batch.sequences.device
        rewards = torch.tensor(
            [[correctness_reward(text, answer) for text in texts]
             for texts, answer in zip(batch.responses_text, prompts.answers)],
            dtype=torch.float32,
            device=device,
        )  # fmt: skip
        return Rollout(
            prompts=prompts,
            batch=batch,
            rewards=rewards,
            advantages=advantages(rewards, self.scale_rewards),
            max_lengths=max_lengths.to(device=device, dtype=torch.float32),
            use_sequence_processor=self.use_sequence_processor,
        )

    def _on_device(self, batch: BatchedSequences) -> BatchedSequences:
        """Replayed responses (read on the CPU) where the model is."""
        device = self.processor.device
        scores = {name: getattr(batch, name) for name in ("token_logprobs", "token_entropies")}
        return replace(
            batch, sequences=batch.sequences.to(device), attention_masks=batch.attention_masks.to(device),
            **{name: None if value is None else value.to(device) for name, value in scores.items()},
        )  # fmt: skip

    def _generate(self, prompts: PromptBatch) -> BatchedSequences:
        G = self.num_samples(prompts.role)
        texts = [format_prompt(self.processor.tokenizer, q) for q in prompts.questions]
        self._check_prompt_lengths(texts, prompts.prompt_ids)
        if self.use_sequence_processor:
            seeds = [sample_seed(prompts, prompt_id, g) for prompt_id in prompts.prompt_ids for g in range(G)]
            return self.processor.generate_batched(texts, G, seeds=seeds)
        return self._legacy_generate(texts, G)

    @torch.no_grad()
    def _legacy_generate(self, prompts: list[str], G: int) -> BatchedSequences:
        """The seed's path: prompt_lens is the padded prompt length."""
        processor, tokenizer = self.processor, self.processor.tokenizer
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(processor.device)
        # The seed's own call, sampling with torch's global generator: one process only (module.py)
        out = processor.sample(encoded.input_ids, encoded.attention_mask, num_return_sequences=G)
        prompt_len = encoded.input_ids.shape[1]
        prompt_mask = encoded.attention_mask.repeat_interleave(G, dim=0)
        return processor.assemble(out[:, :prompt_len], prompt_mask, out[:, prompt_len:], G)

    def _retokenised_max_lengths(self, batch: BatchedSequences) -> torch.Tensor:
        """The seed's L_max: from re-tokenising the decoded responses, which can differ from the generated
        token count (EOS is not in the text)."""
        texts = [text for texts in batch.responses_text for text in texts]
        retokenised = [len(self.processor.tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
        return torch.tensor(retokenised).view(batch.num_prompts, -1).max(dim=1).values.clamp(min=1)

    def _check_prompt_lengths(self, prompts: list[str], prompt_ids: list[int]) -> None:
        context = getattr(self.processor.model.config, "max_position_embeddings", None)
        if context is None:
            return
        max_new_tokens = self.processor.config.max_new_tokens
        lengths = [len(ids) for ids in self.processor.tokenizer(prompts, add_special_tokens=False).input_ids]
        for length, prompt_id in zip(lengths, prompt_ids):
            require(
                length + max_new_tokens <= context,
                f"prompt {prompt_id} has {length} tokens + generation.max_new_tokens "
                f"{max_new_tokens} > the model's context of {context} tokens",
            )
