"""Answer extraction and the correctness reward, on real GSM8K solutions and on edge cases."""

import json
import re

import pytest

from probe_lightning.rewards import correctness_reward, extract_answer, last_number, numbers_equal, parse_number


@pytest.fixture(scope="module")
def gsm8k_solutions(gsm8k_path) -> list[tuple[str, str]]:
    """(solution text after the question, reference answer) for each of the 1,319 GSM8K test problems."""
    rows = []
    for line in gsm8k_path.read_text().splitlines():
        text = json.loads(line)["text"]
        reference = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)[-1].strip()
        solution = text.split("\n<think>", 1)[-1]  # one row has no question, only a solution
        rows.append((solution, reference))
    return rows


def test_every_gsm8k_solution_earns_reward_one(gsm8k_solutions):
    assert len(gsm8k_solutions) == 1319
    assert [correctness_reward(solution, reference) for solution, reference in gsm8k_solutions] == [1.0] * 1319


def test_gsm8k_answers_written_with_thousands_commas_match_their_plain_value(gsm8k_solutions):
    with_commas = [(solution, reference) for solution, reference in gsm8k_solutions if "," in reference]
    assert len(with_commas) == 14
    assert all(correctness_reward(solution, reference.replace(",", "")) == 1.0 for solution, reference in with_commas)


def test_every_gsm8k_solution_with_a_wrong_number_earns_zero(gsm8k_solutions):
    rewards = [correctness_reward(solution, str(parse_number(answer) + 1)) for solution, answer in gsm8k_solutions]
    assert rewards == [0.0] * 1319


def test_extract_answer_takes_the_last_answer_tag():
    assert extract_answer("<answer>3</answer> no wait <answer> 18 </answer> then 7") == "18"


def test_extract_answer_spans_lines_inside_the_tag():
    assert extract_answer("<answer>\n18\n</answer>") == "18"


def test_extract_answer_without_tags_takes_the_last_number():
    assert extract_answer("She has 3 apples, then 5, so 8 in all.") == "8"


def test_extract_answer_keeps_commas_dollars_and_signs_of_the_last_number():
    assert extract_answer("It costs -$1,234.50 now") == "-$1,234.50"


def test_extract_answer_of_text_without_numbers_is_none():
    assert extract_answer("I do not know.") is None


def test_an_unclosed_answer_tag_falls_back_to_the_last_number():
    assert extract_answer("<answer>12 and then 13") == "13"


def test_a_hyphen_between_digits_is_not_a_minus_sign():
    assert last_number("5-3") == "3"


def test_a_minus_after_an_equals_sign_is_a_minus_sign():
    assert last_number("x=-5") == "-5"


def test_thousands_separators_need_groups_of_three():
    assert last_number("1,23") == "23"


@pytest.mark.parametrize(
    ("text", "value"),
    [("18", 18.0), ("18.0", 18.0), ("$18", 18.0), ("1,234", 1234.0), (" -3.5 ", -3.5), ("42.", 42.0), (".5", 0.5)],
)
def test_parse_number_reads_numbers_as_people_write_them(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["18 dollars", "x = 18", "", "abc", "1,23", None])
def test_parse_number_of_anything_but_one_number_is_none(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    ("predicted", "reference"), [("18.0", "18"), ("$18", "18"), ("1,234", "1234"), ("0.1", "0.1000001")]
)
def test_numbers_equal_compares_values_within_1e_6(predicted, reference):
    assert numbers_equal(predicted, reference)


def test_numbers_differing_by_more_than_1e_6_are_not_equal():
    assert not numbers_equal("0.1", "0.10001")


def test_a_correct_tagged_answer_earns_one():
    assert correctness_reward("2 + 2 is <answer>4</answer>", "4") == 1.0


def test_a_wrong_tagged_answer_earns_zero_even_if_the_right_number_appears_before():
    assert correctness_reward("maybe 4? <answer>5</answer>", "4") == 0.0


def test_an_answer_tag_with_words_counts_its_last_number():
    assert correctness_reward("<answer>18 dollars</answer>", "18") == 1.0


def test_a_tag_without_a_number_earns_zero():
    assert correctness_reward("<answer>eighteen</answer>", "18") == 0.0


def test_an_untagged_response_is_judged_by_its_last_number():
    assert correctness_reward("The answer is $1,234.", "1234") == 1.0
    assert correctness_reward("1234, or rather 1235", "1234") == 0.0


def test_a_response_without_numbers_earns_zero():
    assert correctness_reward("I cannot say.", "0") == 0.0
