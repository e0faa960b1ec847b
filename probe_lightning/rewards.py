"""Verifiable rewards: extract the final answer from a response and compare it numerically with the reference.

The built-in reward (the default when no data.reward_fn is given) is `AnswerMatch`, a reward function with
TRL's signature, so the probe calls it exactly as it calls the user's (reward_functions.py).
"""

import math
import re

from probe_lightning.problems import final_answer

ANSWER_TOLERANCE = 1e-6

# A number as people write it: optional minus (not a hyphen between words or digits, as in "5-3"),
# optional "$", digits with optional thousands commas ("1,234") and an optional decimal part.
_NUMBER = re.compile(
    r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"|(?:(?<![\w)])-)?\$?\.\d+"
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_number(text: str) -> str | None:
    """The last number written in `text`, as written (e.g. "-$1,234.5"), or None if there is none."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer> (stripped); without tags, the last number in the text."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    return last_number(text)


def parse_number(text: str | None) -> float | None:
    """The value of a text that is exactly one number ("18", "18.0", "$18", "1,234", "-3.5", "42."), else None."""
    if text is None:
        return None
    candidate = text.strip().rstrip(".")
    if not _NUMBER.fullmatch(candidate):
        return None
    return float(candidate.replace("$", "").replace(",", ""))


def numbers_equal(predicted: str | None, reference: str | None) -> bool:
    """Whether both texts are numbers and their values agree within ANSWER_TOLERANCE."""
    a, b = parse_number(predicted), parse_number(reference)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=0.0, abs_tol=ANSWER_TOLERANCE)


def correctness_reward(response: str, answer: str) -> float:
    """1.0 if the response's final answer equals the reference answer numerically, else 0.0."""
    predicted = extract_answer(response)
    if predicted is not None and parse_number(predicted) is None:
        # An answer tag holding words around the number ("18 dollars", "x = 18") counts its last number.
        predicted = last_number(predicted)
    return 1.0 if numbers_equal(predicted, answer) else 0.0


class AnswerMatch:
    """The built-in answer match as a TRL reward function: 1.0 where a completion's final answer equals the row's
    reference answer (the data set's column `column`; "...#### 42" counts 42), else 0.0."""

    def __init__(self, column: str = "answer"):
        self.column = column
        self.__name__ = "answer_match" if column == "answer" else f"answer_match[{column}]"

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        texts = [completion if isinstance(completion, str) else completion[-1]["content"] for completion in completions]
        references = columns[self.column]
        return [correctness_reward(text, final_answer(str(reference))) for text, reference in zip(texts, references)]


answer_match = AnswerMatch()  # for a TRL GRPOTrainer: reward_funcs=[answer_match]
