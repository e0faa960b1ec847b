"""Rollouts: a prompt batch's sampled, scored responses, as the batch contract the estimators read.

Two ways to make one: the SequenceProcessor path (default) and the seed's legacy path
(direct model.generate with num_return_sequences=G, L_max from re-tokenised text).
"""

from dataclasses import dataclass

import torch

from probe_lightning.estimators import advantages as group_advantages
from probe_lightning.rewards import correctness_reward
from probe_lightning.sequence_processor import BatchedSequences, SequenceProcessor


@dataclass
class Rollout:
    """B prompts x G scored responses of one role ("E" entropy batch, "U" update batch)."""

    role: str
    probe_index: int
    batch: BatchedSequences
    rewards: torch.Tensor  # [B, G] float32
    advantages: torch.Tensor  # [B, G] A_g = r_g - mean r (DR-GRPO)
    max_lengths: torch.Tensor  # [B] float32 L_max(p) >= 1
    prompt_ids: list[int]  # [B] index of each prompt in the data pool
    use_sequence_processor: bool

    @property
    def gen_lens(self) -> torch.Tensor:
        """[B, G] float32, on the sequences' device."""
        return torch.tensor(self.batch.gen_lens, dtype=torch.float32, device=self.batch.sequences.device)

    def select(self, prompts: slice) -> "Rollout":
        return Rollout(
            role=self.role,
            probe_index=self.probe_index,
            batch=self.batch.select(prompts),
            rewards=self.rewards[prompts],
            advantages=self.advantages[prompts],
            max_lengths=self.max_lengths[prompts],
            prompt_ids=self.prompt_ids[prompts],
            use_sequence_processor=self.use_sequence_processor,
        )

    def as_dict(self) -> dict:
        """The seed's batch contract keys."""
        return {
            "sequences": self.batch.sequences,
            "prompt_lens": self.batch.prompt_lens,
            "advantages": self.advantages,
            "max_lengths": self.max_lengths,
            "attention_masks": self.batch.attention_masks,
            "prompt_ids": self.prompt_ids,
            "num_prompts": self.batch.num_prompts,
            "num_responses_per_prompt": self.batch.num_responses_per_prompt,
        }


def score_rollout(
    batch: BatchedSequences, answers: list[str], max_lengths: torch.Tensor, role: str, probe_index: int,
    prompt_ids: list[int], use_sequence_processor: bool,
) -> Rollout:
    """Rewards from each response's text, then advantages per prompt."""
    device = batch.sequences.device
    rewards = torch.tensor(
        [[correctness_reward(text, answer) for text in texts] for texts, answer in zip(batch.responses_text, answers)],
        dtype=torch.float32,
        device=device,
    )
    return Rollout(
        role=role,
        probe_index=probe_index,
        batch=batch,
        rewards=rewards,
        advantages=group_advantages(rewards),
        max_lengths=max_lengths.to(device=device, dtype=torch.float32),
        prompt_ids=prompt_ids,
        use_sequence_processor=use_sequence_processor,
    )


def sequence_processor_lengths(batch: BatchedSequences) -> torch.Tensor:
    """L_max(p) = max_g gen_len_g, at least 1, straight from generation (no re-tokenisation)."""
    return torch.tensor([max(max(lens), 1) for lens in batch.gen_lens])


@torch.no_grad()
def legacy_generate(processor: SequenceProcessor, prompts: list[str], G: int) -> tuple[BatchedSequences, torch.Tensor]:
    """The seed's legacy path: one model.generate(num_return_sequences=G) per rollout batch.

    prompt_lens is the padded prompt length; L_max comes from re-tokenising the decoded responses,
    which can differ from the generated token count (e.g. the EOS token is not in the decoded text).
    """
    tokenizer = processor.tokenizer
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(processor.device)
    out = processor.sample(encoded.input_ids, encoded.attention_mask, num_return_sequences=G)
    prompt_len = encoded.input_ids.shape[1]
    prompt_mask = encoded.attention_mask.repeat_interleave(G, dim=0)
    batch = processor.assemble(out[:, :prompt_len], prompt_mask, out[:, prompt_len:], G)
    texts = [text for texts in batch.responses_text for text in texts]
    B = len(prompts)
    retokenised = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    max_lengths = torch.tensor(retokenised).view(B, G).max(dim=1).values.clamp(min=1)
    return batch, max_lengths
