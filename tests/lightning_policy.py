"""A small policy-gradient run in Lightning, for the Lightning EntropyProbeCallback's tests; as a script, the same
run on two DDP processes (CPU, gloo), its probe table written to the folder given:

    PYTHONPATH=tests python tests/lightning_policy.py OUTPUT_FOLDER

`Policy` trains a tiny Llama (tiny_models.tiny_llama, EOS likely, so lengths differ) with AdamW and the Trainer's
gradient clipping by norm at CLIP, active on every step. A step takes STEP_PROMPTS prompts (the whole batch on
every process: Lightning's DistributedSampler, which shuffles, is off), samples G responses to each with the seeded
sampler (seeds from (step, prompt row, g): the same responses on any number of processes), rewards a response by
its first token, and minimises the GRPO loss, the mean over responses of −Σ_t A log π(y_t) with
A = (r − group mean) / (group std + 1e-4). The prompts are in SHARDS shards, each its own forward, the loss the
mean of the shards'. On two DDP processes each takes one shard and DDP averages the two gradients: exactly
(powers of two scale exactly, and a sum of two is the same either way) the one-process gradient, so one and two
processes take bit-identical steps and the probe's numbers can be compared to float rounding. The prompts have
one token length, so no batch pads them: the E and V forwards are the same on one process and on two.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from tiny_models import tiny_llama
from torch.utils.data import DataLoader

from probe_lightning.data import prompt_token_ids
from probe_lightning.integrations.lightning import EntropyProbeCallback
from probe_lightning.models import DEFAULT_MODEL, load_tokenizer
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor

PROMPTS = [f"What is {a} + {b}?" for a, b in [(2, 3), (1, 1), (3, 4), (5, 2), (6, 1), (8, 9), (4, 4), (9, 3)]]
STEP_PROMPTS = 4  # prompts per optimizer step, over all processes
SHARDS = 2  # a step's prompts in two shards (every other prompt), one forward each; two processes take one each
G = 3
GENERATION = GenerationConfig(max_new_tokens=4)
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 0.01
CLIP = 1.0  # gradient_clip_val: below every step's gradient norm
STEPS = 3
B_E, G_E, B_V, SEED = 4, 3, 4, 7  # the probe's: every step, E and V 4 prompts of the 8, split 2 + 2 under DDP


class Policy(pl.LightningModule):
    def __init__(self, tokenizer, optimizer: str = "adamw"):
        super().__init__()
        self.model = tiny_llama(tokenizer, eos_scale=3.0).train()
        self.tokenizer, self.optimizer_name = tokenizer, optimizer
        self.processor = SequenceProcessor(self.model, tokenizer, GENERATION)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(range(len(PROMPTS))), batch_size=STEP_PROMPTS)  # every process, the whole batch

    def training_step(self, rows: torch.Tensor, batch_idx: int) -> dict:
        """The mean of the shards' losses, each shard by its own forward; this process's shards only."""
        mine = range(self.global_rank, SHARDS, self.trainer.world_size)
        shards = [self.shard_loss(rows.tolist()[shard::SHARDS]) for shard in mine]
        return {
            "loss": torch.stack([loss for loss, _, _ in shards]).mean(),
            "token_logprobs": torch.cat([logprobs for _, logprobs, _ in shards]),
            "advantages": torch.cat([advantages for _, _, advantages in shards]),
        }

    def shard_loss(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The GRPO loss of the prompts `rows`, G responses each, and log π(y_t) (detached) and A(y_t) of their
        response tokens."""
        token_ids = [prompt_token_ids(self.tokenizer, PROMPTS[r]) for r in rows]
        seeds = [response_seed(self.global_step, r, g) for r in rows for g in range(G)]
        batch = self.processor.generate_batched(token_ids, G, seeds=seeds)
        rewards = (batch.sequences[:, :, batch.prompt_len] % 5).float()  # [B, G]: the first response token's id mod 5
        advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
        scores = self.processor.teacher_force_logprobs(batch, with_grad=True)
        mask = scores.response_mask.bool()
        per_token = advantages[..., None].expand_as(mask)
        loss = -(per_token * scores.token_logprobs).sum(-1).mean()
        return loss, scores.token_logprobs.detach()[mask], per_token[mask]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        return torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def response_seed(step: int, row: int, g: int) -> int:
    return int(np.random.SeedSequence([1234, step, row, g]).generate_state(1)[0])


def probe_callback(tokenizer, output_dir: Path | None = None) -> EntropyProbeCallback:
    return EntropyProbeCallback(
        PROMPTS, tokenizer, GENERATION, every_n_steps=1, B_E=B_E, G_E=G_E, B_V=B_V, seed=SEED, output_dir=output_dir
    )


def train(tokenizer, callbacks=(), optimizer: str = "adamw", devices: int = 1) -> tuple[pl.Trainer, Policy]:
    policy = Policy(tokenizer, optimizer)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS,
        use_distributed_sampler=False, gradient_clip_val=CLIP, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(policy)
    return trainer, policy


if __name__ == "__main__":
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    train(tokenizer, [probe_callback(tokenizer, Path(sys.argv[1]))], devices=2)
