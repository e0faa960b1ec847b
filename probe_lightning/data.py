"""Prompts for the probe: each probe's random E/U (and V) draw from a pool of problems (problems.py),
and the rollout batches.

The DataModule yields `PromptBatch`es in the order the module consumes them:
probe 0 E batches, probe 0 U batches, probe 1 E batches, ...
With data.rollouts it yields a saved run's batches instead, each carrying its saved responses (rollout_store.py).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from probe_lightning import rollout_store
from probe_lightning.config import BatchConfig, ProbeConfigError, Role, Source, require
from probe_lightning.problems import Problem, Prompt, check_source, is_conversational, load_problems
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.sequence_processor import BatchedSequences
from probe_lightning.sequential import SequentialSampling


@dataclass
class PromptBatch:
    """One rollout batch: prompts of one probe and one role, processed by one predict_step."""

    probe_index: int
    role: Role
    questions: list[str]  # each prompt as text (Problem.question), for tables and messages
    answers: list[str | None]  # reference final answers of the built-in answer match
    prompt_ids: list[int]  # index of each problem in the source pool
    last_in_probe: bool  # True on the final batch of a probe (the module finalises the probe then)
    replay: BatchedSequences | None = None  # saved responses (data.rollouts), probed instead of generating
    seed: int = 0  # data.seed: with probe, role and prompt id, it seeds each response's sampling
    prompts: list[Prompt] | None = None  # TRL's prompts (Problem.prompt); None: each question as one user turn
    columns: list[dict] | None = None  # the rows' other columns, for the reward functions; None: {"answer": answer}
    saved_rewards: torch.Tensor | None = None  # [B, G] the rewards saved with replayed responses, kept as they are

    def __post_init__(self):
        defaults = [Problem(question, answer) for question, answer in zip(self.questions, self.answers)]
        if self.prompts is None:
            self.prompts = [problem.prompt for problem in defaults]
        if self.columns is None:
            self.columns = [problem.columns for problem in defaults]

    def select(self, prompts: slice) -> "PromptBatch":
        """The prompts[prompts] of this batch (a microbatch of it)."""
        return replace(
            self,
            questions=self.questions[prompts],
            answers=self.answers[prompts],
            prompt_ids=self.prompt_ids[prompts],
            replay=None if self.replay is None else self.replay.select(prompts),
            prompts=self.prompts[prompts],
            columns=self.columns[prompts],
            saved_rewards=None if self.saved_rewards is None else self.saved_rewards[prompts],
        )


def prompt_token_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt's token ids exactly as TRL's GRPOTrainer makes them (`_tokenize_prompts`): chat messages through
    the chat template with the generation prompt, plain text through the tokenizer (its special tokens added).

    A tokenizer without a chat template, where TRL stops, reads a one-user-turn prompt as its text, as the
    probe has always asked a question (format_prompt)."""
    if not is_conversational(prompt):
        return tokenizer(text=prompt)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    require(
        len(prompt) == 1 and prompt[0]["role"] == "user",
        f"chat prompt {prompt!r:.60}: tokenizer {tokenizer.name_or_path!r} has no chat template to format "
        f"{len(prompt)} messages with: give plain-text prompts, or a model whose tokenizer has one",
    )
    return tokenizer(prompt[0]["content"], add_special_tokens=False)["input_ids"]


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
    batch boundaries, each carrying its saved responses and, unless data.rescore, its saved rewards. V batches only
    when the η sweep needs them.

    fresh: for a folder of U batches alone (rollout_store.update_only), probe k's E (and V) batches, drawn and
    sampled as a run without data.rollouts draws them; they come before the probe's saved U batches."""

    def __init__(
        self,
        folder: str,
        evaluate: bool,
        rescore: bool = False,
        fresh: Callable[[int], list[PromptBatch]] | None = None,
    ):
        self.folder, self.evaluate, self.rescore, self.fresh = folder, evaluate, rescore, fresh

    def __iter__(self) -> Iterator[PromptBatch]:
        probe_index = None
        for columns, sequences, last_in_probe in rollout_store.saved_batches(self.folder):
            if self.fresh is not None and columns["probe_index"][0] != probe_index:
                yield from self.fresh(columns["probe_index"][0])
            role, probe_index = columns["role"][0], columns["probe_index"][0]
            if role == "V" and not self.evaluate:
                continue
            yield PromptBatch(
                probe_index=probe_index,
                role=role,
                questions=columns["question"],
                answers=columns["answer"],
                prompt_ids=columns["prompt_id"],
                last_in_probe=last_in_probe,
                replay=sequences,
                prompts=rollout_store.saved_prompts(columns),
                columns=rollout_store.saved_columns(columns),
                saved_rewards=None if self.rescore else torch.tensor(columns["rewards"], dtype=torch.float32),
            )


class ProbeDataModule(pl.LightningDataModule):
    """The problem pool, the reward functions and, for each probe, a random draw of B_E entropy and B_U update
    prompts (and B_V evaluation prompts for the true-change check), disjoint."""

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
        reward_fn: list[str] | str | None = None,
        reward_weights: list[float] | None = None,
        rescore: bool = False,
        target_rse: float | None = None,
        max_prompts: int = 512,
    ):
        """
        Args:
            source: arithmetic (built in), jsonl (data.path a JSONL file) or hf (data.path a local `datasets`
                folder). A file with a `prompt` column is read as TRL's GRPOTrainer reads it (plain text or chat
                messages); else a question column (asked as one user turn) or GSM8K <think>/<answer> text.
            answer_field: the column of reference answers the built-in answer match reads.
            B_V: evaluation (V) prompts per probe, where the true entropy change is measured (model.eta_sweep);
                None: B_E.
            evaluate: draw the V prompts; train.py links it to model.eta_sweep (on when the sweep is).
            save_rollouts: write every rollout to rollouts/ beside results.json (callbacks.RolloutRecorder).
            rollouts: a saved run's rollouts/ folder: probe its samples instead of generating (its prompts
                replace this run's source and batch sizes); its model, checkpoint and sampling must be this run's.
                A folder of U batches alone (identity.json "roles": ["U"]) gets its E (and V) batches drawn
                from this run's source and sampled, as without data.rollouts.
            reward_fn: the trainer's reward function(s), "module:function" each (one, or a list), with TRL's
                signature (reward_functions.py); None: the built-in answer match on data.answer_field.
            reward_weights: one weight per reward function, as TRL's GRPOConfig.reward_weights; None: 1 each.
            rescore: score replayed responses with this run's reward functions instead of keeping the rewards
                saved with them.
            target_rse: sequential sampling: each probe starts at B_E and B_U, then draws more E and U prompts (unused
                ones of the pool, from the same seed stream) until SE / |δH₁| <= target_rse or max_prompts; new
                prompts go where a second of sampling and passes buys the most variance (sequential.py). None: off.
            max_prompts: with target_rse, the most E + U prompts one probe draws.
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
        require(not rescore or rollouts, "data.rescore true re-scores replayed rollouts: it needs data.rollouts")
        require(target_rse is None or target_rse > 0, f"data.target_rse must be > 0, got {target_rse}")
        require(
            target_rse is None or not rollouts,
            "data.target_rse draws more prompts and samples them; data.rollouts replays a fixed set: drop one",
        )
        require(
            target_rse is None or not save_rollouts,
            "data.save_rollouts with data.target_rse would save the first stage's rollouts only: drop one",
        )
        require(max_prompts >= B_E + B_U, f"data.max_prompts = {max_prompts} < data.B_E + data.B_U = {B_E + B_U}")
        # The saved run's identity (rollout_store.py), read now so a bad folder stops the run before the model loads.
        self.replay_identity: dict | None = rollout_store.read_identity(rollouts) if rollouts else None
        self.update_only = rollouts is not None and rollout_store.update_only(self.replay_identity, rollouts)
        require(
            not (reward_fn and rollouts and not rescore and not self.update_only),
            f"data.reward_fn is set, but data.rollouts {rollouts!r} keep the rewards saved with them: add "
            f"--data.rescore true to score them with data.reward_fn, or drop data.reward_fn",
        )
        # Loaded now, so a reward function that does not import stops the run before the model loads.
        self.rewards = RewardFunctions.from_flags(reward_fn, reward_weights, answer_field)
        self.save_hyperparameters()
        self.batch_config = batch_config
        self.problems: list[Problem] = []
        self.probe_draws: list[dict[str, list[int]]] = []  # per probe and role: pool indices

    @property
    def num_evaluation_prompts(self) -> int:
        """B_V, 0 without the true-change check."""
        hp = self.hparams
        return (hp.B_E if hp.B_V is None else hp.B_V) if hp.evaluate else 0

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.rollouts and not self.update_only:
            require(
                self.replay_identity.get("data", {}).get("evaluate") or not hp.evaluate,
                f"model.eta_sweep needs evaluation (V) rollouts, and data.rollouts {hp.rollouts!r} has none: "
                f"save them from a run with model.eta_sweep set",
            )
            return
        self.problems = load_problems(hp.source, hp.path, hp.question_field, hp.answer_field, hp.seed)
        self._check_reference_answers()
        needed = hp.B_E + hp.B_U + self.num_evaluation_prompts
        if len(self.problems) < needed:
            sizes = "data.B_E + data.B_U" + (" + data.B_V" if self.num_evaluation_prompts else "")
            raise ProbeConfigError(
                f"{sizes} = {needed} exceeds the {len(self.problems)} problems of "
                f"{hp.path or hp.source!r}: lower the batch sizes or use a larger dataset"
            )
        # With update-only rollouts, each saved probe's E (and V) prompts are drawn when its batches are read.
        self.probe_draws = [] if self.update_only else [self._draw(k) for k in range(hp.num_probes)]

    def _check_reference_answers(self) -> None:
        """The built-in answer match needs a reference answer in every row."""
        for column in self.rewards.answer_columns:
            missing = [i for i, problem in enumerate(self.problems) if problem.columns.get(column) is None]
            require(
                not missing,
                f"{self.hparams.path or self.hparams.source!r} has no reference answer (column {column!r}, "
                f"data.answer_field) in {len(missing)} of its {len(self.problems)} rows (first: {missing[:5]}), "
                f"which the built-in answer match needs: pass --data.reward_fn module:function, or name the "
                f"answer column with --data.answer_field",
            )

    def _draw(self, k: int) -> dict[str, list[int]]:
        """Probe k's pool indices per role: E and U disjoint; V (if any) disjoint from both."""
        hp, B_V = self.hparams, self.num_evaluation_prompts
        drawn = np.random.default_rng([hp.seed, k]).choice(len(self.problems), size=hp.B_E + hp.B_U, replace=False)
        draw = {"E": drawn[: hp.B_E].tolist(), "U": drawn[hp.B_E :].tolist()}
        if B_V:  # from its own generator, so E and U are the same draws with and without V
            rest = np.setdiff1d(np.arange(len(self.problems)), drawn)
            draw["V"] = np.random.default_rng([hp.seed, k, 1]).choice(rest, size=B_V, replace=False).tolist()
        return draw

    def prompt_batches(self, rank: int = 0, world_size: int = 1) -> list[PromptBatch]:
        """This process's rollout batches in consumption order: per probe E, then V (if any), then U; each
        probe's final U batch has last_in_probe=True. With several processes each takes every
        world_size-th prompt of each role, so each prompt is handled by exactly one."""
        return [
            batch for k, draw in enumerate(self.probe_draws) for batch in self._probe_batches(k, draw, rank, world_size)
        ]

    def _probe_batches(
        self, k: int, draw: dict[str, list[int]], rank: int = 0, world_size: int = 1
    ) -> list[PromptBatch]:
        """Probe k's batches of the roles in `draw`, E, V, U in that order."""
        size = self.batch_config.rollout_batch_size
        batches = []
        for role in ("E", "V", "U"):
            ids = draw.get(role, [])[rank::world_size]
            for start in range(0, len(ids), size):
                chunk = ids[start : start + size]
                problems = [self.problems[i] for i in chunk]
                batches.append(
                    PromptBatch(
                        probe_index=k,
                        role=role,
                        questions=[problem.question for problem in problems],
                        answers=[problem.answer for problem in problems],
                        prompt_ids=chunk,
                        last_in_probe=role == "U" and start + size >= len(ids),
                        seed=self.hparams.seed,
                        prompts=[problem.prompt for problem in problems],
                        columns=[problem.columns for problem in problems],
                    )
                )
        return batches

    def sequential_sampling(self) -> SequentialSampling | None:
        """data.target_rse's stopping rule (None without it); more prompts come from extra_batches."""
        hp = self.hparams
        return None if hp.target_rse is None else SequentialSampling(hp.target_rse, hp.max_prompts)

    def extra_batches(self, k: int, n_E: int, n_U: int) -> list[PromptBatch]:
        """Probe k's next n_E E and n_U U prompts for sequential sampling: pool rows no role of the probe has used,
        drawn by a generator seeded by the data seed, the probe and how many it has drawn (fewer, in proportion,
        when the pool runs short; none when it is spent)."""
        draw = self.probe_draws[k]
        used = [i for ids in draw.values() for i in ids]
        rest = np.setdiff1d(np.arange(len(self.problems)), used)
        if len(rest) < n_E + n_U:
            n_E = n_E * len(rest) // (n_E + n_U)
            n_U = len(rest) - n_E
        drawn = np.random.default_rng([self.hparams.seed, k, 2, len(used)]).choice(rest, n_E + n_U, replace=False)
        more = {"E": drawn[:n_E].tolist(), "U": drawn[n_E:].tolist()}
        for role, ids in more.items():
            draw[role] = draw[role] + ids
        return [replace(batch, last_in_probe=False) for batch in self._probe_batches(k, more)]

    def _fresh_entropy_batches(self, k: int) -> list[PromptBatch]:
        """Probe k's E (and V) batches, for update-only rollouts: the draw a run without data.rollouts makes."""
        draw = self._draw(k)
        del draw["U"]
        return self._probe_batches(k, draw)

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
                sizes["data.B_V"] = self.num_evaluation_prompts
            for name, size in sizes.items():
                require(size >= world_size, f"{name} = {size} < {world_size} processes: each needs a prompt of it")
            require(hp.target_rse is None, "data.target_rse runs on one process only: drop --trainer.devices")
            # Iterable: Lightning leaves it alone (no DistributedSampler), every rank sees every probe's end.
            batches = _Batches(self.prompt_batches(self.trainer.global_rank, world_size))
        elif hp.rollouts:
            fresh = self._fresh_entropy_batches if self.update_only else None
            batches = ReplayedBatches(hp.rollouts, hp.evaluate, hp.rescore, fresh)
        else:
            batches = self.prompt_batches()
        return DataLoader(batches, batch_size=None, collate_fn=identity_collate, num_workers=0)
