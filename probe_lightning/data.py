"""Prompts for the probe: each probe's random E/U (and V) draw from a pool of problems (problems.py),
and the rollout batches.

The DataModule yields `PromptBatch`es in the order the module consumes them:
probe 0 E batches, probe 0 U batches, probe 1 E batches, ...
With data.rollouts it yields a saved run's batches instead, each carrying its saved responses (rollout_store.py).
"""

from collections.abc import Iterator
from dataclasses import dataclass, replace

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from probe_lightning import rollout_store
from probe_lightning.config import BatchConfig, ProbeConfigError, Role, Source, require
from probe_lightning.problems import Problem, check_source, load_problems
from probe_lightning.sequence_processor import BatchedSequences


@dataclass
class PromptBatch:
    """One rollout batch: prompts of one probe and one role, processed by one predict_step."""

    probe_index: int
    role: Role
    questions: list[str]
    answers: list[str]
    prompt_ids: list[int]  # index of each problem in the source pool
    last_in_probe: bool  # True on the final batch of a probe (the module finalises the probe then)
    replay: BatchedSequences | None = None  # saved responses (data.rollouts), probed instead of generating
    seed: int = 0  # data.seed: with probe, role and prompt id, it seeds each response's sampling

    def select(self, prompts: slice) -> "PromptBatch":
        """The prompts[prompts] of this batch (a microbatch of it)."""
        return replace(
            self,
            questions=self.questions[prompts],
            answers=self.answers[prompts],
            prompt_ids=self.prompt_ids[prompts],
            replay=None if self.replay is None else self.replay.select(prompts),
        )


def format_prompt(tokenizer, question: str) -> str:
    """The model's input: the chat template (user turn + generation prompt) if there is one, else the question."""
    if not getattr(tokenizer, "chat_template", None):
        return question
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def identity_collate(batch: PromptBatch) -> PromptBatch:
    """Each dataset item is already a whole rollout batch."""
    return batch


class _Batches(IterableDataset):
    def __init__(self, batches: list[PromptBatch]):
        self.batches = batches

    def __iter__(self) -> Iterator[PromptBatch]:
        return iter(self.batches)


class ReplayedBatches(IterableDataset):
    """A saved run's rollout batches (data.rollouts), read one at a time: the same probes, roles, prompts and
    batch boundaries, each carrying its saved responses. V batches only when the η sweep needs them."""

    def __init__(self, folder: str, evaluate: bool):
        self.folder, self.evaluate = folder, evaluate

    def __iter__(self) -> Iterator[PromptBatch]:
        for columns, sequences in rollout_store.saved_batches(self.folder):
            role = columns["role"][0]
            if role == "V" and not self.evaluate:
                continue
            yield PromptBatch(
                probe_index=columns["probe_index"][0],
                role=role,
                questions=columns["question"],
                answers=columns["answer"],
                prompt_ids=columns["prompt_id"],
                last_in_probe=columns["last_in_probe"][-1],
                replay=sequences,
            )


class ProbeDataModule(pl.LightningDataModule):
    """The problem pool and, for each probe, a random draw of B_E entropy and B_U update prompts (and B_V
    evaluation prompts for the true-change check), disjoint."""

    def __init__(
        self,
        source: Source = "arithmetic",
        path: str | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        B_E: int = 8,
        B_U: int = 8,
        B_V: int | None = None,
        evaluate: bool = False,
        num_probes: int = 1,
        batch_config: BatchConfig = BatchConfig(),
        seed: int = 0,
        save_rollouts: bool = False,
        rollouts: str | None = None,
    ):
        """
        Args:
            B_V: evaluation (V) prompts per probe, where the true entropy change is measured (model.eta_sweep);
                None: B_E.
            evaluate: draw the V prompts; train.py links it to model.eta_sweep (on when the sweep is).
            save_rollouts: write every rollout to rollouts/ beside results.json (callbacks.RolloutRecorder).
            rollouts: a saved run's rollouts/ folder: probe its samples instead of generating (its prompts
                replace this run's source and batch sizes); its model, checkpoint and sampling must be this run's.
        """
        super().__init__()
        require(B_E >= 1, f"data.B_E must be >= 1, got {B_E}")
        require(B_U >= 1, f"data.B_U must be >= 1, got {B_U}")
        require(B_V is None or B_V >= 1, f"data.B_V must be >= 1, got {B_V}")
        require(num_probes >= 1, f"data.num_probes must be >= 1, got {num_probes}")
        check_source(source, path)
        require(
            not (save_rollouts and rollouts),
            f"data.save_rollouts and data.rollouts are both set: the replayed rollouts are saved in {rollouts!r}",
        )
        # The saved run's identity (rollout_store.py), read now so a bad folder stops the run before the model loads.
        self.replay_identity: dict | None = rollout_store.read_identity(rollouts) if rollouts else None
        self.save_hyperparameters()
        self.batch_config = batch_config
        self.problems: list[Problem] = []
        self.probe_draws: list[dict[str, list[int]]] = []  # per probe and role: pool indices

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.rollouts:
            require(
                self.replay_identity["data"]["evaluate"] or not hp.evaluate,
                f"model.eta_sweep needs evaluation (V) rollouts, and data.rollouts {hp.rollouts!r} has none: "
                f"save them from a run with model.eta_sweep set",
            )
            return
        self.problems = load_problems(hp.source, hp.path, hp.question_field, hp.answer_field, hp.seed)
        B_V = (hp.B_E if hp.B_V is None else hp.B_V) if hp.evaluate else 0
        needed = hp.B_E + hp.B_U + B_V
        if len(self.problems) < needed:
            sizes = "data.B_E + data.B_U" + (" + data.B_V" if B_V else "")
            raise ProbeConfigError(
                f"{sizes} = {needed} exceeds the {len(self.problems)} problems of "
                f"{hp.path or hp.source!r}: lower the batch sizes or use a larger dataset"
            )
        self.probe_draws = []
        for k in range(hp.num_probes):
            drawn = np.random.default_rng([hp.seed, k]).choice(len(self.problems), size=needed - B_V, replace=False)
            draw = {"E": drawn[: hp.B_E].tolist(), "U": drawn[hp.B_E :].tolist()}
            if B_V:  # from its own generator, so E and U are the same draws with and without V
                rest = np.setdiff1d(np.arange(len(self.problems)), drawn)
                draw["V"] = np.random.default_rng([hp.seed, k, 1]).choice(rest, size=B_V, replace=False).tolist()
            self.probe_draws.append(draw)

    def prompt_batches(self, rank: int = 0, world_size: int = 1) -> list[PromptBatch]:
        """This process's rollout batches in consumption order: per probe E, then V (if any), then U; each
        probe's final U batch has last_in_probe=True. With several processes each takes every
        world_size-th prompt of each role, so each prompt is handled by exactly one."""
        size = self.batch_config.rollout_batch_size
        batches = []
        for k, draw in enumerate(self.probe_draws):
            for role in ("E", "V", "U"):
                ids = draw.get(role, [])[rank::world_size]
                for start in range(0, len(ids), size):
                    chunk = ids[start : start + size]
                    batches.append(
                        PromptBatch(
                            probe_index=k,
                            role=role,
                            questions=[self.problems[i].question for i in chunk],
                            answers=[self.problems[i].answer for i in chunk],
                            prompt_ids=chunk,
                            last_in_probe=role == "U" and start + size >= len(ids),
                            seed=self.hparams.seed,
                        )
                    )
        return batches

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        world_size = self.trainer.world_size if self.trainer else 1
        if world_size > 1:
            require(
                not (hp.rollouts or hp.save_rollouts),
                "data.rollouts and data.save_rollouts run on one process only: drop --trainer.devices",
            )
            sizes = {"data.B_E": hp.B_E, "data.B_U": hp.B_U}
            if hp.evaluate:
                sizes["data.B_V"] = hp.B_E if hp.B_V is None else hp.B_V
            for name, size in sizes.items():
                require(size >= world_size, f"{name} = {size} < {world_size} processes: each needs a prompt of it")
            # Iterable: Lightning leaves it alone (no DistributedSampler), every rank sees every probe's end.
            batches = _Batches(self.prompt_batches(self.trainer.global_rank, world_size))
        else:
            batches = ReplayedBatches(hp.rollouts, hp.evaluate) if hp.rollouts else self.prompt_batches()
        return DataLoader(batches, batch_size=None, collate_fn=identity_collate, num_workers=0)
