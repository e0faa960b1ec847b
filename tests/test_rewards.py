"""Answer extraction and the correctness reward, on real GSM8K solutions and on edge cases; the user's reward
functions (data.reward_fn), loaded, called and checked as TRL's trainer would call them."""

import json
import math
import re

import datasets
import pytest
import torch
import user_rewards
from enumerable_world import PROMPTS
from cli_helpers import cli_args, results_file

import train
from probe_lightning.config import ProbeConfigError
from probe_lightning.data import ProbeDataModule, PromptBatch
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.rewards import (
    AnswerMatch,
    answer_match,
    correctness_reward,
    extract_answer,
    last_number,
    numbers_equal,
    parse_number,
)


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


# The user's reward functions (reward_functions.py): loaded from module:function, called as TRL calls them


def prompt_batch(questions=("What is 2 + 2?", "What is 3 + 3?"), answers=("4", "6"), **fields) -> PromptBatch:
    return PromptBatch(0, "U", list(questions), list(answers), [7, 9], True, **fields)


def score(functions, completions, names=None, weights=None, batch=None) -> torch.Tensor:
    """Rewards of completions [B][G] (their token ids: their lengths, as stand-ins) under `functions`."""
    completion_ids = [[list(range(len(text))) for text in texts] for texts in completions]
    return RewardFunctions(functions, names, weights).score(batch or prompt_batch(), completions, completion_ids)


def test_the_default_reward_is_the_built_in_answer_match():
    rewards = score(None, [["<answer>4</answer>", "<answer>5</answer>"], ["It is 6.", "no idea"]])
    assert rewards.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_answer_match_is_a_trl_reward_function_for_text_and_chat_completions():
    completions = [[{"role": "assistant", "content": "<answer>42</answer>"}], "41", "<answer>42</answer>"]
    assert answer_match(prompts=["q"] * 3, completions=completions, answer=["#### 42", "42", 42]) == [1.0, 0.0, 1.0]


def test_answer_match_reads_the_column_data_answer_field_names():
    assert AnswerMatch("target")(prompts=["q"], completions=["<answer>4</answer>"], target=[4]) == [1.0]


def test_reward_functions_load_from_module_function_paths():
    one = RewardFunctions.from_flags("user_rewards:token_sum", None)
    two = RewardFunctions.from_flags(["user_rewards:token_sum", "user_rewards:fails"], [1.0, 0.5])
    assert one.functions == [user_rewards.token_sum] and one.names == ["user_rewards:token_sum"]
    assert two.functions == [user_rewards.token_sum, user_rewards.fails] and two.weights.tolist() == [1.0, 0.5]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("user_rewards", "data.reward_fn 'user_rewards' is not module:function: write it as, e.g., my_rewards:"),
        (
            "no_such_module:f",
            "data.reward_fn 'no_such_module:f': module 'no_such_module' does not import (ModuleNotFoundError: No "
            "module named 'no_such_module'): put the folder that holds it on PYTHONPATH and check that it imports",
        ),
        ("user_rewards:nothing", "module 'user_rewards' (/"),
        ("user_rewards:nothing", "user_rewards.py) has no function 'nothing': name one of its functions"),
        ("user_rewards:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
    ],
)
def test_a_reward_function_path_that_does_not_load_is_refused_before_the_model_loads(path, message):
    with pytest.raises(ProbeConfigError, match=re.escape(message)) as error:
        ProbeDataModule(reward_fn=path)
    assert "\n" not in str(error.value)


def test_a_reward_module_that_fails_to_import_is_named_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("def f(prompts, completions, **kw):\n    return [\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ProbeConfigError, match=r"module 'broken_rewards' does not import \(SyntaxError: ") as error:
        ProbeDataModule(reward_fn="broken_rewards:f")
    assert "\n" not in str(error.value)


def test_reward_weights_of_another_length_are_refused_naming_both_lengths():
    message = "data.reward_weights has 2 weights for 1 reward functions (user_rewards:token_sum): give one weight"
    with pytest.raises(ProbeConfigError, match=re.escape(message)):
        ProbeDataModule(reward_fn="user_rewards:token_sum", reward_weights=[1.0, 2.0])


def test_weighted_functions_sum_over_those_that_scored_and_give_nan_where_none_did():
    def first(prompts, completions, **columns):
        return [1.0, None, None]

    def second(prompts, completions, **columns):
        return [2.0, 4.0, None]

    rewards = score([first, second], [["a", "b", "c"]], weights=[3.0, 0.5], batch=prompt_batch(["q"], ["1"]))
    torch.testing.assert_close(rewards, torch.tensor([[4.0, 2.0, torch.nan]]), equal_nan=True)


def test_a_function_gets_prompts_completions_ids_and_the_columns_but_no_trainer_only_arguments():
    calls = []

    def strict(prompts, completions, completion_ids, answer, level):  # no **kwargs: any other argument fails
        calls.append((prompts, completions, completion_ids, answer, level))
        return [0.0] * len(completions)

    batch = prompt_batch(["q"], ["1"], columns=[{"answer": "1", "level": 2}])
    score([strict], [["ab", "c"]], batch=batch)
    chat = [[{"role": "user", "content": "q"}]] * 2, [[{"role": "assistant", "content": t}] for t in ("ab", "c")]
    assert calls == [(*chat, [[0, 1], [0]], ["1", "1"], [2, 2])]


def test_plain_text_prompts_get_plain_text_completions():
    calls = []

    def keeps(prompts, completions, **columns):
        calls.append((prompts, completions))
        return [0.0] * len(completions)

    score([keeps], [["ab", "c"]], batch=prompt_batch(["q"], ["1"], prompts=["The sky is"]))
    assert calls == [(["The sky is"] * 2, ["ab", "c"])]


def test_an_async_reward_function_is_awaited():
    async def later(prompts, completions, **columns):
        return [float(len(completion[0]["content"])) for completion in completions]

    assert score([later], [["ab", "c"], ["", "abcd"]]).tolist() == [[2.0, 1.0], [0.0, 4.0]]


def test_a_function_that_changes_its_arguments_leaves_the_batch_as_it_was():
    def meddles(prompts, completions, answer, **columns):
        prompts[0][0]["content"] = "changed"
        answer[0] = "changed"
        return [0.0] * len(completions)

    batch = prompt_batch()
    score([meddles], [["a"], ["b"]], batch=batch)
    assert batch.prompts[0] == [{"role": "user", "content": "What is 2 + 2?"}] and batch.columns[0] == {"answer": "4"}


def returns(values):
    def reward(prompts, completions, **columns):
        return values

    return reward


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0], "returned 1 values for the 2 completions of prompt 7 ('What is 2 + 2?'): return one float (or None) "
                "per completion"),
        (3.0, "returned a float for the 2 completions of prompt 7"),
        ([1.0, float("nan")], "returned nan for completion 1 of prompt 7 ('What is 2 + 2?'): return a finite float, "
                              "or None for a completion it does not score"),
        ([float("inf"), 1.0], "returned inf for completion 0 of prompt 7"),
        (["1.0", 1.0], "returned '1.0' for completion 0 of prompt 7"),
    ],
)  # fmt: skip
def test_a_wrong_count_nan_or_non_number_stops_the_run_naming_the_function_and_prompt(values, message):
    with pytest.raises(ProbeConfigError, match=re.escape(f"reward function user_rewards:f {message}")) as error:
        score([returns(values)], [["a", "b"], ["c", "d"]], names=["user_rewards:f"])
    assert "\n" not in str(error.value)


def test_a_function_that_raises_stops_the_run_naming_it_and_the_start_of_the_prompt():
    batch = prompt_batch(["What is 2 + 2?", "Write the number that comes after one thousand and one, please."])
    with pytest.raises(ProbeConfigError) as error:
        score([user_rewards.fails], [["a"], ["b"]], names=["user_rewards:fails"], batch=batch)
    assert str(error.value) == (
        "reward function user_rewards:fails raised ZeroDivisionError: float division by zero on prompt 7 "
        "('What is 2 + 2?'): fix it"
    )
    assert isinstance(error.value.__cause__, ZeroDivisionError)


def test_the_error_quotes_the_start_of_a_long_prompt():
    batch = prompt_batch(["Write the number that comes after one thousand and one, please.", "q"])
    with pytest.raises(ProbeConfigError, match=re.escape("prompt 7 ('Write the number that comes after one th'...)")):
        score([user_rewards.fails], [["a"], ["b"]], names=["user_rewards:fails"], batch=batch)


# On the command line


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "digits.jsonl"
    path.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in PROMPTS * 10))
    return str(path)


def test_a_reward_function_on_the_command_line_scores_the_responses(world, prompts_file, tmp_path):
    flags = ["--data.reward_fn", "user_rewards:token_sum", "--data.reward_weights", "[0.5]", "--data.save_rollouts"]
    train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", *flags, "true"))
    folder = results_file(tmp_path).parent
    rows = datasets.load_from_disk(str(folder / "rollouts" / "probe_0"))
    sums = [
        [0.5 * sum(sequence[row["prompt_len"] :]) for sequence in row["sequences"]] for row in rows  # the world: no EOS
    ]
    assert rows["rewards"] == sums and len({reward for group in sums for reward in group}) > 1
    results = json.loads(results_file(tmp_path).read_text())
    assert results["reward_mean"] == pytest.approx(sum(map(sum, sums)) / (8 * 4), rel=1e-6)


def test_a_reward_function_path_that_does_not_import_stops_the_cli_in_one_line(world, prompts_file, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", "--data.reward_fn", "no_such:f"))
    text = str(exit_info.value.code)
    assert "\n" not in text and text.startswith("error: data.reward_fn 'no_such:f': module 'no_such' does not import")


def test_a_failing_reward_function_stops_the_cli_in_one_line_and_saves_nothing(world, prompts_file, tmp_path):
    flags = ["--data.reward_fn", "user_rewards:fails", "--data.save_rollouts", "true"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", *flags))
    text = str(exit_info.value.code)
    assert "\n" not in text and re.fullmatch(
        r"error: reward function user_rewards:fails raised ZeroDivisionError: float division by zero on prompt \d+ "
        r"\('\d \d'\): fix it",
        text,
    ), text
    assert not list(tmp_path.glob("**/probe_0")) and not list(tmp_path.glob("**/results.json"))


@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_unscored_responses_are_left_out_of_the_reward_mean_and_the_mixed_prompts(
    world, prompts_file, tmp_path, scale_rewards
):
    flags = ["--data.reward_fn", "user_rewards:even_token_sum", "--model.trainer.scale_rewards", scale_rewards]
    train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", *flags, "--data.save_rollouts", "true"))
    rows = datasets.load_from_disk(str(results_file(tmp_path).parent / "rollouts" / "probe_0"))
    sums = [[sum(sequence[row["prompt_len"] :]) for sequence in row["sequences"]] for row in rows]
    scored = [[float(s) for s in group if s % 2 == 0] for group in sums]
    assert 0 < sum(map(len, scored)) < 8 * 4  # some responses scored, some not
    assert [[r for r in group if r == r] for group in rows["rewards"]] == scored  # NaN where not scored
    results = json.loads(results_file(tmp_path).read_text())
    assert results["reward_mean"] == pytest.approx(sum(map(sum, scored)) / sum(map(len, scored)), rel=1e-6)
    mixed = [len(set(group)) > 1 for group, row in zip(scored, rows) if row["role"] == "U"]
    assert results["probes"][0]["mixed_update_fraction"] == sum(mixed) / 4
    assert math.isfinite(results["delta_h1"]) and math.isfinite(results["delta_h1_se"])


def test_a_batch_nothing_scored_gives_zero_advantages_and_strict_json(world, prompts_file, tmp_path):
    """TRL: no reward, no advantage (its nanstd of nothing is NaN, its advantages NaN -> 0): the step has no
    reward gradient, and results.json writes the undefined reward mean as null, not NaN."""
    flags = ["--data.reward_fn", "user_rewards:never_scores", "--model.trainer.scale_rewards", "batch"]
    train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", *flags))
    text = results_file(tmp_path).read_text()
    results = json.loads(text, parse_constant=lambda name: pytest.fail(f"results.json holds {name}"))
    assert results["reward_mean"] is None and results["probes"][0]["mixed_update_fraction"] == 0
    assert results["delta_h1"] == 0.0 and results["probes"][0]["y_norm"] == 0.0
