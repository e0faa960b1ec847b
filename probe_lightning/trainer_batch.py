"""A GRPO trainer's generation batch as the probe's saved rollouts, to replay the very step the trainer took.

`save_trainer_batch` writes one generation batch (TRL's tensors and the rewards the trainer gave) as a
U-only rollouts folder (rollout_store.py): identity.json with "roles": ["U"], and probe_0/ holding the batch
as one U rollout batch, a row per prompt with its G completions. Then

    train.py predict --model.checkpoint checkpoint-N --data.rollouts FOLDER ...

probes the update step the trainer took from checkpoint-N on exactly those completions and rewards (the E
batch is sampled fresh). TRL's layout maps onto BatchedSequences directly: the left-padded prompts fill
[:P], the completions follow, and the attention mask is prompt_mask then completion_mask, which is 1 up to
and including the first EOS (truncated completions stay in the loss unless mask_truncated_completions zeroes
them, which a gen_len of 0 reproduces).
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from probe_lightning import rollout_store
from probe_lightning.build import sampling_identity
from probe_lightning.config import require
from probe_lightning.problems import Prompt, prompt_text
from probe_lightning.sampling import GenerationConfig


@dataclass
class TrainerBatch:
    """One generation batch of a GRPO trainer, with TRL's names: N = prompts × G rows, in any order (TRL
    shuffles them before the loss; rows are grouped by their prompt's tokens)."""

    prompt_ids: torch.Tensor  # [N, P] long, left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, C] long, right-padded
    completion_mask: torch.Tensor  # [N, C] 1 on the tokens the loss counts: a prefix of each row
    rewards: torch.Tensor  # [N] the reward the trainer used (reward functions weighted and summed)
    prompts: list[Prompt]  # [N] each row's prompt as the data set gave it to the trainer (text or chat messages)
    columns: list[dict] = field(default_factory=list)  # [N] the rows' other columns, if any (reward arguments)

    def __post_init__(self):
        N, P = self.prompt_ids.shape
        self.columns = self.columns or [{} for _ in range(N)]
        require(
            self.prompt_mask.shape == (N, P) and self.completion_mask.shape == self.completion_ids.shape
            and self.completion_ids.shape[0] == N and self.rewards.shape == (N,)
            and len(self.prompts) == len(self.columns) == N,
            f"trainer batch: prompt_ids {list(self.prompt_ids.shape)}, prompt_mask {list(self.prompt_mask.shape)}, "
            f"completion_ids {list(self.completion_ids.shape)}, completion_mask {list(self.completion_mask.shape)}, "
            f"rewards {list(self.rewards.shape)}, {len(self.prompts)} prompts and {len(self.columns)} column rows "
            f"do not describe the same rows",
        )  # fmt: skip
        # A left-padded prompt's mask never falls back to 0, a completion's never rises back to 1.
        require(
            bool((self.prompt_mask.diff(dim=1) >= 0).all()),
            "trainer batch: prompt_mask is not left padding (a 0 after a 1 in some row): pass TRL's left-padded "
            "prompts",
        )
        require(
            bool((self.completion_mask.diff(dim=1) <= 0).all()),
            "trainer batch: completion_mask has a 1 after a 0 in some row (a tool mask?): the probe counts each "
            "completion's first gen_len tokens only",
        )


def prompt_groups(batch: TrainerBatch, G: int) -> list[list[int]]:
    """Each prompt's G rows, prompts in order of first appearance, matched by their prompt's tokens, not by
    position. A prompt text in k rows of the data set has k·G rows here, split into k groups in row order:
    the trainer's own groups only when the rows come in its order (TRL: before its shuffle)."""
    rows_of: dict[tuple[int, ...], list[int]] = {}
    for row, (ids, mask) in enumerate(zip(batch.prompt_ids.tolist(), batch.prompt_mask.tolist())):
        rows_of.setdefault(tuple(i for i, m in zip(ids, mask) if m), []).append(row)
    for rows in rows_of.values():
        require(
            len(rows) % G == 0,
            f"trainer batch: prompt {prompt_text(batch.prompts[rows[0]])!r:.60} has {len(rows)} completions, not "
            f"a multiple of G={G}: pass the whole generation batch and the trainer's num_generations",
        )
    return [rows[start : start + G] for rows in rows_of.values() for start in range(0, len(rows), G)]


def reference_answer(columns: dict) -> str | None:
    answer = columns.get("answer")
    return None if answer is None else str(answer)


def update_rows(batch: TrainerBatch, G: int, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The batch as one U rollout batch of rollout_store.FEATURES rows, a row per prompt with its G completions."""
    sequences = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention_masks = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    gen_lens = batch.completion_mask.sum(dim=1).tolist()
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(batch.completion_ids, gen_lens)]
    return [
        {
            "probe_index": 0,
            "batch_index": 0,
            "role": "U",
            "last_in_probe": True,
            "prompt_id": prompt_id,
            "question": prompt_text(batch.prompts[rows[0]]),
            "answer": reference_answer(batch.columns[rows[0]]),  # for the record: the rewards are the trainer's
            "prompt_len": batch.prompt_ids.shape[1],
            "sequences": sequences[rows].tolist(),
            "attention_masks": attention_masks[rows].tolist(),
            "gen_lens": [gen_lens[r] for r in rows],
            "responses_text": [texts[r] for r in rows],
            "rewards": batch.rewards[rows].tolist(),
            "prompt": json.dumps(batch.prompts[rows[0]]),
            "columns": json.dumps(batch.columns[rows[0]]),
            "token_logprobs": None,  # teacher forcing computes them
            "token_entropies": None,
        }
        for prompt_id, rows in enumerate(prompt_groups(batch, G))
    ]


def save_trainer_batch(
    folder: str | Path,
    batch: TrainerBatch,
    G: int,
    tokenizer: PreTrainedTokenizerBase,
    model: str | None,
    checkpoint: str,
    sampling: GenerationConfig,
) -> None:
    """Write `batch` as a U-only rollouts folder for a replay with --model.checkpoint `checkpoint`.

    model, checkpoint: the replay's --model.model and --model.checkpoint, as it will spell them.
    sampling: how the trainer sampled (TRL: its temperature and top_p, max_new_tokens = max_completion_length,
        its pad and EOS ids, no stop strings); pad/EOS left None are the tokenizer's, as in the probe.
    """
    folder = Path(folder)
    sampling = replace(
        sampling,
        pad_token_id=tokenizer.pad_token_id if sampling.pad_token_id is None else sampling.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if sampling.eos_token_id is None else sampling.eos_token_id,
    )
    rows = update_rows(batch, G, tokenizer)
    # null: what a trainer's batch cannot know (G_E: the replay samples its own E batch; use_sequence_processor:
    # neither of the probe's paths sampled it), which a replay does not check (rollout_store.check_replay).
    identity = dict.fromkeys(rollout_store.IDENTITY_FLAGS) | {
        "model": model,
        "checkpoint": checkpoint,
        "G": G,
        "roles": ["U"],
        "sampling": sampling_identity(sampling),
        "data": {"source": "a trainer's generation batch", "B_U": len(rows), "num_probes": 1},
    }
    rollout_store.write_identity(folder, identity)
    rollout_store.save_probe(folder, 0, rows)
