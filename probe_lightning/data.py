"""Prompts for the probe: a pool of problems, each probe's random E/U draw, and the rollout batches.

Sources: a built-in arithmetic task (no files), a JSONL file, or a local `datasets` folder.
The DataModule yields `PromptBatch`es in the order the module consumes them:
probe 0 E batches, probe 0 U batches, probe 1 E batches, ...
With data.rollouts it yields a saved run's batches instead, each carrying its saved responses (rollout_store.py).
"""

import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import get_args

import datasets
import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from probe_lightning import rollout_store
from probe_lightning.config import BatchConfig, ProbeConfigError, Role, Source, require
from probe_lightning.sequence_processor import BatchedSequences

log = logging.getLogger(__name__)

SOURCES = get_args(Source)
# The arithmetic task multiplies a number in [2, ARITHMETIC_MAX_FACTOR] by 1, in either order.
# Why so easy: SmolLM2-135M-Instruct sampled at temperature 1 (top_p 1) gets under 20% of single-digit sums
# right, but 36% of these products, with 78% of prompts mixed over 4 samples (bench/arithmetic_rate.py),
# so most groups have non-zero advantages.
ARITHMETIC_MAX_FACTOR = 999
ARITHMETIC_QUESTION = "Answer in the form <answer>number</answer>. What is {a} × {b}?"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class Problem:
    question: str  # raw question text (no chat template)
    answer: str  # reference final answer, e.g. "18"


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


def arithmetic_problems(seed: int = 0) -> list[Problem]:
    """Every product of 1 and a number in [2, ARITHMETIC_MAX_FACTOR], both orders, shuffled by `seed`."""
    factors = range(2, ARITHMETIC_MAX_FACTOR + 1)
    pairs = [(a, 1) for a in factors] + [(1, b) for b in factors]
    random.Random(seed).shuffle(pairs)
    return [Problem(ARITHMETIC_QUESTION.format(a=a, b=b), str(a * b)) for a, b in pairs]


def load_problems(
    source: str = "arithmetic",
    path: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    seed: int = 0,
) -> list[Problem]:
    """The pool of problems of a source; `seed` orders the built-in arithmetic task."""
    check_source(source, path)
    if source == "arithmetic":
        return arithmetic_problems(seed)
    if source == "jsonl":
        _check_json_lines(path)
        dataset = datasets.load_dataset("json", data_files=path, split="train")
    else:
        dataset = _load_local_dataset(path)
    problems = problems_from_dataset(dataset, question_field, answer_field, path)
    log.info("Loaded %d problems from %s", len(problems), path)
    return problems


def check_source(source: str, path: str | None) -> None:
    """Refuse an unknown source, or a file source without an existing path, before anything loads."""
    require(source in SOURCES, f"data.source must be one of {', '.join(SOURCES)}; got {source!r}")
    if source == "arithmetic":
        return
    require(path is not None, f"data.path is required for data.source={source!r}, got None: pass --data.path")
    kind = "file" if source == "jsonl" else "folder"
    require(Path(path).exists(), f"data.path: no such {kind} {path!r}")


def _check_json_lines(path: str) -> None:
    """Every non-blank line is one JSON object; `datasets` would only say that some line was not."""
    lines = Path(path).read_bytes().splitlines()
    require(
        any(line.strip() for line in lines),
        f'data.path {path!r} holds no JSON lines: write one {{"question": ..., "answer": ...}} object per line',
    )
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"data.path {path!r} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ProbeConfigError(
                f"{where} is not valid JSON ({err.msg}: column {err.colno}): fix or remove that line"
            ) from err
        except UnicodeDecodeError as err:
            raise ProbeConfigError(
                f"{where} is not UTF-8 text ({err.reason} at byte {err.start}): save the file as UTF-8"
            ) from err
        if not isinstance(row, dict):
            raise ProbeConfigError(
                f"{where} is a JSON {type(row).__name__}, not an object: "
                'write one {"question": ..., "answer": ...} object per line'
            )


def _load_local_dataset(path: str) -> datasets.Dataset:
    """A save_to_disk folder, else a data folder `datasets.load_dataset` reads offline; split "test" or the first."""
    folder = Path(path)
    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        loaded = datasets.load_from_disk(path)
    else:
        loaded = datasets.load_dataset(path)
    if isinstance(loaded, datasets.DatasetDict):
        split = "test" if "test" in loaded else next(iter(loaded))
        return loaded[split]
    return loaded


def problems_from_dataset(
    dataset: datasets.Dataset, question_field: str, answer_field: str, path: str
) -> list[Problem]:
    """Question/answer columns, else a GSM8K `text` column "QUESTION\\n<think>...</think>\\n<answer>X</answer>"."""
    columns = dataset.column_names
    if question_field in columns and answer_field in columns:
        return [
            Problem(str(question), final_answer(str(answer)))
            for question, answer in zip(dataset[question_field], dataset[answer_field])
        ]
    require(
        "text" in columns,
        f"data.question_field/data.answer_field: columns {question_field!r}/{answer_field!r} not in {path!r} "
        f"(columns found: {columns}); set them to the file's columns, "
        f"or give a 'text' column in the <think>/<answer> format",
    )
    problems, skipped = [], []
    for row, text in enumerate(dataset["text"]):
        answers = _ANSWER_TAG.findall(text)
        if "\n<think>" not in text or not answers:
            skipped.append(row)
            continue
        problems.append(Problem(text.split("\n<think>", 1)[0].strip(), answers[-1].strip()))
    if skipped:
        log.warning(
            "Skipped %d rows of %s without 'QUESTION\\n<think>' and <answer>: rows %s", len(skipped), path, skipped
        )
    return problems


def final_answer(answer: str) -> str:
    """A GSM8K solution "...\\n#### 42" gives "42"; any other answer is kept as it is (stripped)."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def identity_collate(batch: PromptBatch) -> PromptBatch:
    """Each dataset item is already a whole rollout batch."""
    return batch


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

    def prompt_batches(self) -> list[PromptBatch]:
        """All rollout batches in consumption order: per probe E, then V (if any), then U; each probe's
        final U batch has last_in_probe=True."""
        size = self.batch_config.rollout_batch_size
        batches = []
        for k, draw in enumerate(self.probe_draws):
            for role in ("E", "V", "U"):
                ids = draw.get(role, [])
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
                        )
                    )
        return batches

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        batches = ReplayedBatches(hp.rollouts, hp.evaluate) if hp.rollouts else self.prompt_batches()
        return DataLoader(batches, batch_size=None, collate_fn=identity_collate, num_workers=0)
