"""The problem pool (the probe's formats and TRL's), the prompts' token ids, the per-probe E/U draws, the rollout
batches, and the errors for bad data input."""

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from jsonargparse import ArgumentParser
from tiny_models import tiny_llama

from probe_lightning.config import BatchConfig, ProbeConfigError
from probe_lightning.data import ProbeDataModule, PromptBatch, format_prompt, prompt_token_ids
from probe_lightning.problems import ARITHMETIC_MAX_FACTOR, Problem, load_problems, user_turn
from probe_lightning.rewards import correctness_reward
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor


def datamodule(**kwargs) -> ProbeDataModule:
    data = ProbeDataModule(**kwargs)
    data.setup("predict")
    return data


def batch_shape(batch: PromptBatch) -> tuple:
    return batch.probe_index, batch.role, len(batch.questions), batch.last_in_probe


@pytest.fixture
def qa_file(tmp_path) -> str:
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    rows.append({"question": "How many?", "answer": "She has 40 + 2 = 42.\n#### 42"})
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# The built-in arithmetic pool


def test_the_arithmetic_pool_holds_every_product_with_one_once():
    problems = load_problems("arithmetic")
    assert len(problems) == 2 * (ARITHMETIC_MAX_FACTOR - 1)
    assert len({problem.question for problem in problems}) == len(problems)


def test_arithmetic_answers_are_the_products():
    problem = next(p for p in load_problems("arithmetic") if "What is 1 × 37?" in p.question)
    assert problem.answer == "37"
    assert correctness_reward("<answer>37</answer>", problem.answer) == 1.0


def test_arithmetic_questions_ask_for_answer_tags():
    assert all("<answer>" in p.question and "</answer>" in p.question for p in load_problems("arithmetic"))


def test_the_arithmetic_pool_order_is_fixed_by_the_seed():
    assert load_problems("arithmetic", seed=3) == load_problems("arithmetic", seed=3)
    assert load_problems("arithmetic", seed=3) != load_problems("arithmetic", seed=4)


# Per-probe draws


def test_draws_are_deterministic_under_the_seed():
    first = datamodule(B_E=4, B_U=4, num_probes=3, seed=7)
    second = datamodule(B_E=4, B_U=4, num_probes=3, seed=7)
    assert first.probe_draws == second.probe_draws
    assert datamodule(B_E=4, B_U=4, num_probes=3, seed=8).probe_draws != first.probe_draws


def test_each_probe_draws_b_e_and_b_u_disjoint_problems():
    data = datamodule(B_E=5, B_U=3, num_probes=4)
    for draw in data.probe_draws:
        assert (len(draw["E"]), len(draw["U"])) == (5, 3) and "V" not in draw
        assert len(set(draw["E"]) | set(draw["U"])) == 8


def test_the_evaluation_prompts_are_disjoint_and_leave_e_and_u_unchanged():
    without = datamodule(B_E=5, B_U=3, num_probes=2)
    data = datamodule(B_E=5, B_U=3, num_probes=2, evaluate=True)
    for draw, plain in zip(data.probe_draws, without.probe_draws):
        assert (draw["E"], draw["U"]) == (plain["E"], plain["U"])
        assert len(draw["V"]) == 5 and len(set(draw["E"]) | set(draw["U"]) | set(draw["V"])) == 13
    assert len(datamodule(B_E=5, B_U=3, B_V=7, evaluate=True).probe_draws[0]["V"]) == 7


def test_probes_draw_independently():
    data = datamodule(B_E=4, B_U=4, num_probes=2)
    assert data.probe_draws[0] != data.probe_draws[1]


def test_a_probe_draw_does_not_depend_on_the_number_of_probes():
    assert datamodule(num_probes=1).probe_draws[0] == datamodule(num_probes=3).probe_draws[0]


# Rollout batches


def test_batches_come_probe_by_probe_e_before_u_with_the_last_u_batch_flagged():
    data = datamodule(B_E=4, B_U=4, num_probes=2, batch_config=BatchConfig(rollout_batch_size=4))
    assert [batch_shape(b) for b in data.predict_dataloader()] == [
        (0, "E", 4, False), (0, "U", 4, True), (1, "E", 4, False), (1, "U", 4, True),
    ]  # fmt: skip


def test_evaluation_batches_come_between_e_and_u():
    data = datamodule(B_E=2, B_U=2, B_V=3, evaluate=True, batch_config=BatchConfig(rollout_batch_size=2))
    assert [batch_shape(b) for b in data.predict_dataloader()] == [
        (0, "E", 2, False), (0, "V", 2, False), (0, "V", 1, False), (0, "U", 2, True),
    ]  # fmt: skip


def test_rollout_batch_size_chunks_each_role_with_a_remainder_batch():
    data = datamodule(B_E=5, B_U=3, batch_config=BatchConfig(rollout_batch_size=2))
    assert [batch_shape(b) for b in data.predict_dataloader()] == [
        (0, "E", 2, False), (0, "E", 2, False), (0, "E", 1, False), (0, "U", 2, False), (0, "U", 1, True),
    ]  # fmt: skip


def test_batches_carry_the_drawn_problems_and_their_pool_indices():
    data = datamodule(B_E=3, B_U=2, batch_config=BatchConfig(rollout_batch_size=8))
    e_batch, u_batch = list(data.predict_dataloader())
    draw = data.probe_draws[0]
    assert e_batch.prompt_ids == draw["E"] and u_batch.prompt_ids == draw["U"]
    for batch, ids in ((e_batch, draw["E"]), (u_batch, draw["U"])):
        rows = zip(batch.questions, batch.answers, batch.prompts, batch.columns)
        assert [Problem(*row) for row in rows] == [data.problems[i] for i in ids]


def test_the_datamodule_saves_its_hyperparameters():
    data = ProbeDataModule(B_E=3, num_probes=2, seed=5)
    assert (data.hparams.B_E, data.hparams.num_probes, data.hparams.seed) == (3, 2, 5)


def test_jsonargparse_builds_the_batch_config_from_a_nested_dict():
    parser = ArgumentParser()
    parser.add_class_arguments(ProbeDataModule, "data")
    config = parser.parse_object({"data": {"B_E": 2, "batch_config": {"rollout_batch_size": 4}}})
    data = parser.instantiate_classes(config).data
    assert data.batch_config == BatchConfig(rollout_batch_size=4) and data.hparams.B_E == 2


def test_batch_config_defaults_when_not_given():
    assert ProbeDataModule().batch_config == BatchConfig()


# File sources


def test_gsm8k_jsonl_loads_every_problem_with_a_question(gsm8k_path, caplog):
    problems = load_problems("jsonl", str(gsm8k_path))
    first_text = json.loads(gsm8k_path.read_text().splitlines()[0])["text"]
    # Row 861 of the file holds only a solution (no question, no <think>): it is skipped with a warning.
    assert len(problems) == 1318
    assert "rows [861]" in caplog.text
    assert problems[0] == Problem(first_text.split("\n<think>")[0], "18")
    assert problems[0].question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert problems[0].question.endswith("How much in dollars does she make every day at the farmers' market?")


def test_question_answer_jsonl_takes_the_number_after_hashes_as_the_answer(qa_file):
    problems = load_problems("jsonl", qa_file)
    assert problems[0] == Problem("What is 0 + 1?", "1")
    assert (problems[-1].question, problems[-1].answer) == ("How many?", "42")
    # The reward functions get the column as the data set holds it; the built-in match reads the number after ####.
    assert problems[-1].columns == {"answer": "She has 40 + 2 = 42.\n#### 42"}


def test_a_question_is_asked_as_one_user_turn():
    assert Problem("What is 0 + 1?", "1").prompt == [{"role": "user", "content": "What is 0 + 1?"}]


def test_custom_column_names_are_read(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"prompt": "2 + 2?", "target": 4, "level": 1}) + "\n")
    problems = load_problems("jsonl", str(path), question_field="prompt", answer_field="target")
    assert problems == [Problem("2 + 2?", "4", columns={"target": 4, "level": 1})]


def test_a_saved_dataset_folder_loads_via_hf(tmp_path):
    datasets.Dataset.from_dict({"question": ["a?", "b?"], "answer": ["1", "#### 2"]}).save_to_disk(tmp_path / "ds")
    problems = load_problems("hf", str(tmp_path / "ds"))
    assert problems == [Problem("a?", "1"), Problem("b?", "2", columns={"answer": "#### 2"})]


def test_a_saved_dataset_dict_uses_its_test_split(tmp_path):
    splits = {
        "train": datasets.Dataset.from_dict({"question": ["train?"], "answer": ["1"]}),
        "test": datasets.Dataset.from_dict({"question": ["test?"], "answer": ["2"]}),
    }
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dd")
    assert load_problems("hf", str(tmp_path / "dd")) == [Problem("test?", "2")]


def test_a_data_folder_of_jsonl_files_loads_via_hf(tmp_path, qa_file):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "test.jsonl").write_text(Path(qa_file).read_text())
    assert load_problems("hf", str(tmp_path / "folder"))[-1].answer == "42"


def test_a_jsonl_datamodule_draws_from_the_file(qa_file):
    data = datamodule(source="jsonl", path=qa_file, B_E=3, B_U=3)
    assert sorted(data.probe_draws[0]["E"] + data.probe_draws[0]["U"]) == list(range(6))


# Bad input: one line naming the field and the value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"B_E": 0}, "data.B_E must be >= 1, got 0"),
        ({"B_U": -1}, "data.B_U must be >= 1, got -1"),
        ({"num_probes": 0}, "data.num_probes must be >= 1, got 0"),
        ({"source": "csv"}, "data.source must be one of arithmetic, jsonl, hf; got 'csv'"),
        ({"source": "jsonl"}, "data.path is required for data.source='jsonl', got None"),
        ({"source": "jsonl", "path": "/x/y.jsonl"}, "data.path: no such file '/x/y.jsonl'"),
        ({"source": "hf", "path": "/x/folder"}, "data.path: no such folder '/x/folder'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_loads(kwargs, message):
    with pytest.raises(ProbeConfigError, match=re.escape(message)) as error:
        ProbeDataModule(**kwargs)
    assert "\n" not in str(error.value)


def test_missing_columns_are_named_with_the_columns_found(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"query": "2 + 2?", "solution": "4"}) + "\n")
    message = (
        r"data.question_field/data.answer_field: columns 'question'/'answer' not in .*other.jsonl"
        r".*\(columns found: \['query', 'solution'\]\); .* give a 'prompt' column \(TRL's format\)"
    )
    with pytest.raises(ProbeConfigError, match=message):
        load_problems("jsonl", str(path))


def test_a_pool_smaller_than_b_e_plus_b_u_is_refused(qa_file):
    data = ProbeDataModule(source="jsonl", path=qa_file, B_E=4, B_U=3)
    with pytest.raises(ProbeConfigError, match=r"data.B_E \+ data.B_U = 7 exceeds the 6 problems of .*qa.jsonl"):
        data.setup("predict")


# Prompt formatting


def test_format_prompt_applies_the_chat_template(tokenizer):
    prompt = format_prompt(tokenizer, "What is 1 × 2?")
    assert prompt.endswith("<|im_start|>user\nWhat is 1 × 2?<|im_end|>\n<|im_start|>assistant\n")


def test_format_prompt_without_a_chat_template_is_the_question(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    assert format_prompt(tokenizer, "What is 1 × 2?") == "What is 1 × 2?"


def test_a_question_is_tokenized_as_the_probe_always_did(tokenizer):
    questions = ["What is 1 × 2?", "Answer in the form <answer>number</answer>. What is 37 × 1?"]
    texts = [format_prompt(tokenizer, question) for question in questions]
    token_ids = [prompt_token_ids(tokenizer, user_turn(question)) for question in questions]
    assert token_ids == tokenizer(texts, add_special_tokens=False).input_ids
    processor = SequenceProcessor(tiny_llama(tokenizer), tokenizer, GenerationConfig(max_new_tokens=1))
    for from_ids, from_texts in zip(processor.encode_prompts(token_ids), processor.encode_prompts(texts)):
        assert torch.equal(from_ids, from_texts)  # the same left-padded ids and mask


def test_without_a_chat_template_a_question_is_its_text(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    expected = tokenizer("What is 1 × 2?", add_special_tokens=False).input_ids
    assert prompt_token_ids(tokenizer, user_turn("What is 1 × 2?")) == expected


def test_without_a_chat_template_a_conversation_is_refused(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(ProbeConfigError, match=r"has no chat template to format 2 messages with: give plain-text"):
        prompt_token_ids(tokenizer, messages)


# TRL's format: a prompt column, plain text or chat messages, every other column kept for the reward functions

SYSTEM = {"role": "system", "content": "Answer with a number."}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_prompt_column_of_text_is_read_as_trl_reads_it(tmp_path):
    rows = [{"prompt": "2 + 2 =", "answer": "#### 4", "level": 1}, {"prompt": "3 + 3 =", "answer": "6", "level": 2}]
    problems = load_problems("jsonl", write_jsonl(tmp_path / "plain.jsonl", rows))
    assert problems == [
        Problem("2 + 2 =", "4", "2 + 2 =", {"answer": "#### 4", "level": 1}),
        Problem("3 + 3 =", "6", "3 + 3 =", {"answer": "6", "level": 2}),
    ]


def test_a_prompt_column_of_chat_messages_keeps_the_system_turn(tmp_path):
    chat = [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}]
    datasets.Dataset.from_list([{"prompt": chat, "solution": "4"}]).save_to_disk(tmp_path / "chat")
    (problem,) = load_problems("hf", str(tmp_path / "chat"))
    assert problem == Problem("What is 2 + 2?", None, chat, {"solution": "4"})  # no `answer` column: no answer


def test_data_answer_field_names_the_answer_of_a_trl_data_set(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "2 + 2 =", "solution": "4"}])
    assert load_problems("jsonl", path, answer_field="solution")[0].answer == "4"


def test_a_data_set_mixing_text_and_chat_prompts_is_refused(tmp_path):
    rows = [{"prompt": "2 + 2 ="}, {"prompt": [{"role": "user", "content": "3 + 3?"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ProbeConfigError, match=r"mixed.jsonl' mixes plain-text and chat prompts; TRL formats a batch"):
        load_problems("jsonl", path)


def test_a_prompt_that_is_neither_text_nor_messages_is_named_by_its_row(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "2 + 2 ="}, {"prompt": 17}])
    message = "bad.jsonl' row 1: prompt 17 is neither text nor chat messages: write a string or a list of"
    with pytest.raises(ProbeConfigError, match=re.escape(message)):
        load_problems("jsonl", path)


def test_a_column_named_as_a_reward_function_argument_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "clash.jsonl", [{"prompt": "2 + 2 =", "completions": 1}])
    with pytest.raises(ProbeConfigError, match=r"has columns \['completions'\], names of the reward functions' own"):
        load_problems("jsonl", path)


def test_without_answers_the_built_in_reward_is_refused_in_one_line(tmp_path):
    path = write_jsonl(tmp_path / "no_answer.jsonl", [{"prompt": f"{i} + 1 ="} for i in range(4)])
    data = ProbeDataModule(source="jsonl", path=path, B_E=2, B_U=2)
    with pytest.raises(ProbeConfigError) as error:
        data.setup("predict")
    assert str(error.value) == (
        f"{path!r} has no reference answer (column 'answer', data.answer_field) in 4 of its 4 rows (first: "
        "[0, 1, 2, 3]), which the built-in answer match needs: pass --data.reward_fn module:function, or name the "
        "answer column with --data.answer_field"
    )
    datamodule(source="jsonl", path=path, B_E=2, B_U=2, reward_fn="user_rewards:token_sum")  # a reward function


def test_batches_carry_the_trl_prompts_and_columns(tmp_path):
    rows = [{"prompt": [SYSTEM, {"role": "user", "content": f"{i} + 1?"}], "answer": str(i + 1)} for i in range(4)]
    data = datamodule(source="jsonl", path=write_jsonl(tmp_path / "chat.jsonl", rows), B_E=2, B_U=2)
    for batch in data.predict_dataloader():
        assert batch.prompts == [data.problems[i].prompt for i in batch.prompt_ids]
        assert batch.columns == [{"answer": str(i + 1)} for i in batch.prompt_ids]


def test_a_microbatch_selects_the_prompts_columns_and_saved_rewards():
    batch = PromptBatch(0, "U", ["a", "b"], ["1", "2"], [3, 4], True, saved_rewards=torch.tensor([[1.0], [0.0]]))
    micro = batch.select(slice(1, 2))
    assert (micro.prompts, micro.columns) == ([[{"role": "user", "content": "b"}]], [{"answer": "2"}])
    assert micro.saved_rewards.tolist() == [[0.0]]


def test_rescoring_without_replayed_rollouts_is_refused():
    with pytest.raises(ProbeConfigError, match="data.rescore true re-scores replayed rollouts: it needs data.rollouts"):
        ProbeDataModule(rescore=True)
