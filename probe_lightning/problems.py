"""Where problems come from: a built-in arithmetic task (no files), a JSONL file, or a local `datasets`
folder; each a pool of problems the DataModule draws probes from.

A data set with a `prompt` column is read as TRL's GRPOTrainer reads it: the prompt as it is (plain text, or
chat messages), and every other column kept for the reward functions. The probe's own formats (a question
column, GSM8K `<think>/<answer>` text, the arithmetic task) ask their question as one user turn.
"""

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import datasets

from probe_lightning.config import ProbeConfigError, Source, require

log = logging.getLogger(__name__)

SOURCES = get_args(Source)
# The arithmetic task multiplies a number in [2, ARITHMETIC_MAX_FACTOR] by 1, in either order.
# Why so easy: SmolLM2-135M-Instruct sampled at temperature 1 (top_p 1) gets under 20% of single-digit sums
# right, but 36% of these products, with 78% of prompts mixed over 4 samples (bench/arithmetic_rate.py),
# so most groups have non-zero advantages.
ARITHMETIC_MAX_FACTOR = 999
ARITHMETIC_QUESTION = "Answer in the form <answer>number</answer>. What is {a} × {b}?"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# The columns TRL never passes to a reward function (GRPOTrainer._calculate_rewards).
NOT_REWARD_COLUMNS = ("prompt", "completion", "completion_ids")

Prompt = str | list[dict]  # TRL's prompt: plain text, or chat messages {"role": ..., "content": ...}


@dataclass
class Problem:
    """One row of the data set as the user's trainer reads it."""

    question: str  # the prompt as text, for tables and messages: the question, or the last user turn's content
    answer: str | None  # the reference final answer of the built-in answer match, e.g. "18"; None: the row has none
    prompt: Prompt | None = None  # TRL's prompt; None: the question as one user turn
    columns: dict | None = None  # the row's other columns, the reward functions' keyword arguments; None: the answer

    def __post_init__(self):
        if self.prompt is None:
            self.prompt = user_turn(self.question)
        if self.columns is None:
            self.columns = {} if self.answer is None else {"answer": self.answer}


def user_turn(question: str) -> list[dict]:
    """A question asked as the probe has always asked it: one user turn of the chat template."""
    return [{"role": "user", "content": question}]


def is_conversational(prompt: Prompt) -> bool:
    """TRL's rule (trl.data_utils.is_conversational): a list whose first item is a message with a role."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def arithmetic_problems(seed: int = 0, answer_field: str = "answer") -> list[Problem]:
    """Every product of 1 and a number in [2, ARITHMETIC_MAX_FACTOR], both orders, shuffled by `seed`; the
    answer is the column `answer_field` of the reward functions."""
    factors = range(2, ARITHMETIC_MAX_FACTOR + 1)
    pairs = [(a, 1) for a in factors] + [(1, b) for b in factors]
    random.Random(seed).shuffle(pairs)
    return [
        Problem(ARITHMETIC_QUESTION.format(a=a, b=b), str(a * b), columns={answer_field: str(a * b)}) for a, b in pairs
    ]


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
        return arithmetic_problems(seed, answer_field)
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
    """TRL's `prompt` column (unless data.question_field names it), else question/answer columns, else a GSM8K
    `text` column "QUESTION\\n<think>...</think>\\n<answer>X</answer>"."""
    columns = dataset.column_names
    clashes = sorted(set(columns) & {"prompts", "completions"})
    require(
        not clashes,
        f"data.path {path!r} has columns {clashes}, names of the reward functions' own arguments: rename them",
    )
    if "prompt" in columns and question_field != "prompt":
        return _trl_problems(dataset, answer_field, path)
    if question_field in columns and answer_field in columns:
        problems = []
        for row in dataset:
            answer = final_answer(str(row[answer_field]))
            problems.append(Problem(str(row[question_field]), answer, columns=_reward_columns(row, question_field)))
        return problems
    require(
        "text" in columns,
        f"data.question_field/data.answer_field: columns {question_field!r}/{answer_field!r} not in {path!r} "
        f"(columns found: {columns}); set them to the file's columns, give a 'prompt' column (TRL's format), "
        f"or a 'text' column in the <think>/<answer> format",
    )
    problems, skipped = [], []
    for row, text in enumerate(dataset["text"]):
        answers = _ANSWER_TAG.findall(text)
        if "\n<think>" not in text or not answers:
            skipped.append(row)
            continue
        answer = answers[-1].strip()
        problems.append(Problem(text.split("\n<think>", 1)[0].strip(), answer, columns={answer_field: answer}))
    if skipped:
        log.warning(
            "Skipped %d rows of %s without 'QUESTION\\n<think>' and <answer>: rows %s", len(skipped), path, skipped
        )
    return problems


def _trl_problems(dataset: datasets.Dataset, answer_field: str, path: str) -> list[Problem]:
    """Rows as GRPOTrainer reads them: the prompt as it is; the answer column, if any, for the built-in answer
    match; every column but the prompt for the reward functions."""
    problems = []
    for number, row in enumerate(dataset):
        prompt = row["prompt"]
        require(
            isinstance(prompt, str) or is_conversational(prompt),
            f"data.path {path!r} row {number}: prompt {prompt!r:.60} is neither text nor chat messages: "
            f'write a string or a list of {{"role": ..., "content": ...}} messages',
        )
        answer = row.get(answer_field)
        reference = None if answer is None else final_answer(str(answer))
        problems.append(Problem(prompt_text(prompt), reference, prompt, _reward_columns(row)))
    kinds = {is_conversational(problem.prompt) for problem in problems}
    require(
        len(kinds) <= 1,
        f"data.path {path!r} mixes plain-text and chat prompts; TRL formats a batch by its first prompt: "
        f"write every prompt one way",
    )
    return problems


def _reward_columns(row: dict, *also_excluded: str) -> dict:
    """The columns TRL passes to a reward function: all but the prompt (and completion, completion_ids)."""
    return {key: value for key, value in row.items() if key not in (*NOT_REWARD_COLUMNS, *also_excluded)}


def prompt_text(prompt: Prompt) -> str:
    """The prompt as one text, for tables and messages: plain text as it is, else the last user turn's content."""
    if isinstance(prompt, str):
        return prompt
    users = [message for message in prompt if message.get("role") == "user"]
    return str((users or prompt)[-1].get("content"))


def final_answer(answer: str) -> str:
    """A GSM8K solution "...\\n#### 42" gives "42"; any other answer is kept as it is (stripped)."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()
