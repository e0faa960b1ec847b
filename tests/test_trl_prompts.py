"""The user's data and reward as TRL's GRPOTrainer reads them: the same prompt token ids, the same reward-function
calls, the same aggregation of several weighted functions (None included) and the same advantages.

TRL's own code runs on a GRPOTrainer built around a tiny random Llama with the default model's real tokenizer:
`_tokenize_prompts` gives its prompt ids, `_generate_and_score_completions` samples completions and turns the
reward functions' values into advantages. The reward functions record what they are called with, and return
values read from a column, so both sides score the same completions with the same numbers.
"""

import datasets
import pytest
import torch
import trl
from tiny_models import tiny_llama
from trl.trainer.utils import nanstd as trl_nanstd

from probe_lightning import trainer_loss
from probe_lightning.accumulator import ProbeSums
from probe_lightning.data import PromptBatch, prompt_token_ids
from probe_lightning.problems import prompt_text
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.rollout import RolloutMaker
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor

G = 4
MAX_COMPLETION_LENGTH = 8
WEIGHTS = [2.0, 0.5]
PROMPTS = {
    "plain": ["The cat sat", "Two plus two is"],
    "chat": [
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What colour is the sky?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}],
    ],
}
# The data set's other columns. `first` and `second` hold what the two reward functions return for each of the
# prompt's G completions: completion 1 of prompt 0 and completion 2 of prompt 1 are scored by neither.
COLUMNS = [
    {"answer": "blue", "level": 3, "first": [1.0, None, 0.5, None], "second": [None, None, 2.0, 3.0]},
    {"answer": "7", "level": 1, "first": [0.0, 1.0, None, 1.0], "second": [1.0, None, None, 0.5]},
]
TRAINER_ONLY = ("trainer_state", "log_extra", "log_metric")


class Recording:
    """A reward function with TRL's signature: returns its column's value for each completion, keeps its calls."""

    def __init__(self, column: str):
        self.column, self.calls = column, []
        self.__name__ = column

    def __call__(self, prompts, completions, completion_ids, **columns):
        arguments = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        self.calls.append({name: value for name, value in arguments.items() if name not in TRAINER_ONLY})
        return [values[i % G] for i, values in enumerate(columns[self.column])]


@pytest.fixture(scope="module")
def recordings() -> list[Recording]:
    return [Recording("first"), Recording("second")]


@pytest.fixture(scope="module")
def grpo_trainer(tokenizer, recordings, tmp_path_factory):
    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=2 * G,  # both prompts in one generation batch
        num_generations=G,
        max_completion_length=MAX_COMPLETION_LENGTH,
        reward_weights=WEIGHTS,
    )
    trainer = trl.GRPOTrainer(
        model=tiny_llama(tokenizer, eos_scale=5.0),  # EOS likely enough that completion lengths differ
        reward_funcs=recordings,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS["plain"]}),
        processing_class=tokenizer,
    )
    trainer.model.train()
    return trainer


def trl_rows(kind: str) -> list[dict]:
    """The generation batch as TRL's RepeatSampler hands it over: each row G times, prompt-major."""
    return [{"prompt": prompt, **columns} for prompt, columns in zip(PROMPTS[kind], COLUMNS) for _ in range(G)]


def prompt_batch(kind: str) -> PromptBatch:
    prompts = PROMPTS[kind]
    return PromptBatch(
        probe_index=0, role="U", questions=[prompt_text(p) for p in prompts], answers=[c["answer"] for c in COLUMNS],
        prompt_ids=[0, 1], last_in_probe=True, prompts=prompts, columns=COLUMNS,
    )  # fmt: skip


@pytest.fixture(scope="module")
def scored(grpo_trainer, recordings, tokenizer) -> dict:
    """Per prompt kind and scale_rewards: TRL's output and reward-function calls, and the probe's on the same
    completions (assembled from TRL's token ids as the probe's generation assembles its own)."""
    processor = SequenceProcessor(grpo_trainer.model, tokenizer, GenerationConfig(max_new_tokens=MAX_COMPLETION_LENGTH))
    functions = RewardFunctions(recordings, ["tests:first", "tests:second"], WEIGHTS)
    maker = RolloutMaker(processor, True, G, G, "group", functions)
    runs = {}
    for kind in PROMPTS:
        for scale in ("group", "batch", "none"):
            grpo_trainer.scale_rewards = scale
            for recording in recordings:
                recording.calls.clear()
            output = grpo_trainer._generate_and_score_completions(trl_rows(kind))
            trl_calls = [recording.calls.pop() for recording in recordings]
            batch = processor.assemble(output["prompt_ids"], output["prompt_mask"], output["completion_ids"], G)
            rewards = maker.score(prompt_batch(kind), batch)
            probe_calls = [list(recording.calls) for recording in recordings]  # one call per prompt
            runs[kind, scale] = dict(output=output, trl_calls=trl_calls, probe_calls=probe_calls, rewards=rewards)
    return runs


# Prompts


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_the_prompt_token_ids_are_trl_prompt_ids(grpo_trainer, tokenizer, kind):
    trl_ids = grpo_trainer._tokenize_prompts(PROMPTS[kind])[0]
    assert [prompt_token_ids(tokenizer, prompt) for prompt in PROMPTS[kind]] == [list(ids) for ids in trl_ids]


def test_a_plain_prompt_is_its_text_and_a_chat_prompt_holds_its_system_turn(tokenizer):
    plain, chat = PROMPTS["plain"][0], PROMPTS["chat"][0]
    assert tokenizer.decode(prompt_token_ids(tokenizer, plain)) == plain
    assert tokenizer.decode(prompt_token_ids(tokenizer, chat)) == (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nWhat colour is the sky?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_the_probe_generates_from_trl_prompt_ids(grpo_trainer, tokenizer, kind, one_thread):
    processor = SequenceProcessor(tiny_llama(tokenizer), tokenizer, GenerationConfig(max_new_tokens=2))
    rollout = RolloutMaker(processor, True, G, G, "group", RewardFunctions([_zeros]))(prompt_batch(kind))
    trl_ids = grpo_trainer._tokenize_prompts(PROMPTS[kind])[0]
    P = rollout.batch.prompt_len
    for b, ids in enumerate(trl_ids):
        for g in range(G):
            prompt_mask = rollout.batch.attention_masks[b, g, :P].bool()
            assert rollout.batch.sequences[b, g, :P][prompt_mask].tolist() == list(ids)


def _zeros(prompts, completions, **columns):
    return [0.0] * len(completions)


# Reward functions


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_reward_functions_get_trl_arguments(scored, kind):
    run = scored[kind, "group"]
    for trl_call, probe_calls in zip(run["trl_calls"], run["probe_calls"]):
        assert len(probe_calls) == 2  # once per prompt, its G completions
        joined = {name: [v for call in probe_calls for v in call[name]] for name in probe_calls[0]}
        assert joined.keys() == trl_call.keys() == {"prompts", "completions", "completion_ids", *COLUMNS[0]}
        assert joined == trl_call


def test_chat_completions_are_assistant_messages_and_plain_ones_text(scored):
    chat, plain = scored["chat", "group"]["trl_calls"][0], scored["plain", "group"]["trl_calls"][0]
    assert all(c == [{"role": "assistant", "content": c[0]["content"]}] for c in chat["completions"])
    assert all(isinstance(c, str) for c in plain["completions"])


def test_several_weighted_functions_with_none_sum_as_trl_does(scored):
    rewards = scored["chat", "group"]["rewards"]
    # 2·first + 0.5·second over the functions that scored a completion; NaN where neither did.
    expected = torch.tensor([[2.0, torch.nan, 2.0, 1.5], [0.5, 2.0, torch.nan, 2.25]])
    torch.testing.assert_close(rewards, expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_advantages_equal_trl_with_unscored_completions(scored, kind, scale_rewards):
    run = scored[kind, scale_rewards]
    expected = run["output"]["advantages"].view(2, G)
    advantages = trainer_loss.advantages(run["rewards"], scale_rewards)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=0)
    assert advantages[0, 1] == 0 and advantages[1, 2] == 0  # unscored: no learning signal


def test_the_update_batch_std_of_batch_scaling_is_trl_nanstd():
    rewards = torch.tensor([[2.0, torch.nan, 2.0, 1.5], [0.5, 2.0, torch.nan, 2.25]])
    sums = ProbeSums([])
    sums.count("U", rewards, torch.zeros(2, 4, 3), torch.ones(2, 4, 3))
    expected = trl_nanstd(rewards)
    assert torch.cat(sums.update_rewards).std() == expected == trainer_loss.nanstd(rewards)
    assert sums.counts["U"].scored_responses == 6 and sums.reward_mean == pytest.approx(10.25 / 6)
