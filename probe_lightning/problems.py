"""Where problems come from: a built-in arithmetic task (no files), a JSONL file, or a local `datasets`
folder; each a pool of (question, answer) problems the DataModule draws probes from."""

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


@dataclass
class Problem:
    question: str  # raw question text (no chat template)
    answer: str  # reference final answer, e.g. "18"


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
