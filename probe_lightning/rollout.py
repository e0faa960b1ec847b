"""Rollouts: a prompt batch's sampled, scored responses, as the batch contract the estimators read.

`RolloutMaker` is the one place that makes them, for both generation paths:
- the SequenceProcessor path (default): batched generation, lengths and masks straight from it;
- the seed's legacy path: one model.generate(num_return_sequences=G) per rollout batch, L_max from
  re-tokenised text (kept to reproduce the seed's numbers).
Both generate from the prompts' token ids as TRL's GRPOTrainer makes them (data.prompt_token_ids), and the
run's reward functions score the responses as TRL's trainer calls them (reward_functions.py).
A replayed batch (data.rollouts) brings its saved responses and the rewards saved with them (re-scored with
data.rescore).
"""

import json
from dataclasses import dataclass

import numpy as np
import torch

from probe_lightning.config import ScaleRewards, require
from probe_lightning.data import PromptBatch, prompt_token_ids
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.sequence_processor import BatchedSequences, SequenceProcessor
from probe_lightning.trainer_loss import advantages


@dataclass
class Rollout:
    """The B prompts of one PromptBatch, G scored responses each."""

    prompts: PromptBatch
    batch: BatchedSequences
    rewards: torch.Tensor  # [B, G] float32, NaN where no reward function scored the response
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

    def saved_rows(self, batch_index: int) -> list[dict]:
        """This rollout batch as saved rollouts (rollout_store.FEATURES), one row per prompt."""
        prompts, batch = self.prompts, self.batch
        sequences, masks, rewards = batch.sequences.tolist(), batch.attention_masks.tolist(), self.rewards.tolist()
        recorded = batch.token_entropies is not None
        token_logprobs = batch.token_logprobs.tolist() if recorded else [None] * len(sequences)
        token_entropies = batch.token_entropies.tolist() if recorded else [None] * len(sequences)
        return [
            {
                "probe_index": prompts.probe_index,
                "batch_index": batch_index,
                "role": prompts.role,
                "last_in_probe": prompts.last_in_probe,
                "prompt_id": prompt_id,
                "question": prompts.questions[b],
                "answer": prompts.answers[b],
                "prompt_len": batch.prompt_lens[b],
                "sequences": sequences[b],
                "attention_masks": masks[b],
                "gen_lens": batch.gen_lens[b],
                "responses_text": batch.responses_text[b],
                "rewards": rewards[b],
                "prompt": json.dumps(prompts.prompts[b]),
                "columns": json.dumps(prompts.columns[b]),
                "token_logprobs": token_logprobs[b],
                "token_entropies": token_entropies[b],
            }
            for b, prompt_id in enumerate(prompts.prompt_ids)
        ]


def sample_seed(prompts: PromptBatch, prompt_id: int, response: int) -> int:
    """The seed of one response's generator: (data seed, probe, role, prompt id, response index), so the
    same config samples the same responses on any number of processes and in any batch."""
    entropy = [prompts.seed, prompts.probe_index, "EVU".index(prompts.role), prompt_id, response]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class RolloutMaker:
    """PromptBatch -> Rollout: prompts tokenized as TRL does, G samples each from q, rewards, advantages.

    scale_rewards "batch" divides by the whole U batch's reward std, known only when the probe ends:
    its rollouts carry r - mean r and the probe applies the factor to ∇J̄.
    """

    def __init__(
        self,
        processor: SequenceProcessor,
        use_sequence_processor: bool,
        G: int,
        G_E: int,
        scale_rewards: ScaleRewards,
        rewards: RewardFunctions | None = None,
    ):
        """rewards: the run's reward functions (the DataModule's); None: the built-in answer match."""
        self.processor = processor
        self.use_sequence_processor = use_sequence_processor
        self.G, self.G_E = G, G_E
        self.scale_rewards = "group" if scale_rewards == "group" else "none"
        self.rewards = RewardFunctions() if rewards is None else rewards

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
        rewards = prompts.saved_rewards if prompts.saved_rewards is not None else self.score(prompts, batch)
        rewards = rewards.to(device=device, dtype=torch.float32)
        return Rollout(
            prompts=prompts,
            batch=batch,
            rewards=rewards,
            advantages=advantages(rewards, self.scale_rewards),
            max_lengths=max_lengths.to(device=device, dtype=torch.float32),
            use_sequence_processor=self.use_sequence_processor,
        )

    def score(self, prompts: PromptBatch, batch: BatchedSequences) -> torch.Tensor:
        """[B, G] rewards of the batch's responses: their texts and token ids (EOS included, no padding), as TRL
        hands them to its reward functions."""
        P, responses = batch.prompt_len, batch.sequences.tolist()
        completion_ids = [
            [sequence[P : P + length] for sequence, length in zip(sequences, lengths)]
            for sequences, lengths in zip(responses, batch.gen_lens)
        ]
        return self.rewards.score(prompts, batch.responses_text, completion_ids)

    def _on_device(self, batch: BatchedSequences) -> BatchedSequences:
        """Replayed responses (read on the CPU) where the model is."""
        return batch.to(self.processor.device)

    def _generate(self, prompts: PromptBatch) -> BatchedSequences:
        G = self.num_samples(prompts.role)
        token_ids = [prompt_token_ids(self.processor.tokenizer, prompt) for prompt in prompts.prompts]
        self._check_prompt_lengths(token_ids, prompts.prompt_ids)
        if self.use_sequence_processor:
            seeds = [sample_seed(prompts, prompt_id, g) for prompt_id in prompts.prompt_ids for g in range(G)]
            return self.processor.generate_batched(token_ids, G, seeds=seeds)
        return self._legacy_generate(token_ids, G)

    @torch.no_grad()
    def _legacy_generate(self, token_ids: list[list[int]], G: int) -> BatchedSequences:
        """The seed's path: prompt_lens is the padded prompt length."""
        processor = self.processor
        ids, mask = processor.encode_prompts(token_ids)
        # The seed's own call, sampling with torch's global generator: one process only (module.py)
        out = processor.sample(ids, mask, num_return_sequences=G)
        prompt_len = ids.shape[1]
        return processor.assemble(out[:, :prompt_len], mask.repeat_interleave(G, dim=0), out[:, prompt_len:], G)

    def _retokenised_max_lengths(self, batch: BatchedSequences) -> torch.Tensor:
        """The seed's L_max: from re-tokenising the decoded responses, which can differ from the generated
        token count (EOS is not in the text)."""
        texts = [text for texts in batch.responses_text for text in texts]
        retokenised = [len(self.processor.tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
        return torch.tensor(retokenised).view(batch.num_prompts, -1).max(dim=1).values.clamp(min=1)

    def _check_prompt_lengths(self, token_ids: list[list[int]], prompt_ids: list[int]) -> None:
        context = getattr(self.processor.model.config, "max_position_embeddings", None)
        if context is None:
            return
        max_new_tokens = self.processor.config.max_new_tokens
        for length, prompt_id in zip(map(len, token_ids), prompt_ids):
            require(
                length + max_new_tokens <= context,
                f"prompt {prompt_id} has {length} tokens + generation.max_new_tokens "
                f"{max_new_tokens} > the model's context of {context} tokens",
            )
