"""The reward functions of the user's trainer, called as TRL's GRPOTrainer calls them, and TRL's aggregation.

`--data.reward_fn module:function` (several: a list) names functions with TRL's reward-function signature,

    def reward(prompts, completions, completion_ids, **columns) -> list[float | None]

called with keyword arguments: `prompts`, TRL's prompt objects (plain text or chat messages), each repeated G
times; `completions`, the decoded responses (special tokens skipped), for chat prompts as
[{"role": "assistant", "content": text}]; `completion_ids`, each response's token ids (its EOS included, no
padding); and the data set's other columns by name, each value repeated G times. One value per completion;
None: the function does not score that completion. An async function is awaited. TRL's trainer-only keyword
arguments (trainer_state, log_extra, log_metric, environments) are not passed: a function must not need them.
Without data.reward_fn the reward is the built-in answer match (rewards.AnswerMatch), called the same way.

The probe calls each function once per prompt (its G completions), so an error names the prompt; TRL calls it
once per generation batch, which gives the same values for every function that scores each completion on its
own, as TRL's documentation asks of them.

Several functions are combined as TRL 1.16's default (multi_objective_aggregation="sum_then_normalize"): None
becomes NaN, the reward is the weighted sum over the functions that scored the completion
(data.reward_weights, default 1 each), and NaN where none did; trainer_loss.advantages leaves such a
completion out of its group's mean and std and gives it advantage 0.
"""

import asyncio
import copy
import importlib
import inspect
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from probe_lightning.config import ProbeConfigError, require
from probe_lightning.problems import Prompt, is_conversational
from probe_lightning.rewards import AnswerMatch

if TYPE_CHECKING:
    from probe_lightning.data import PromptBatch

log = logging.getLogger(__name__)

RewardFunction = Callable[..., list[float | None]]


def load_reward_function(path: str) -> RewardFunction:
    """The function `path` = "module:function" names; a path that does not import stops the run in one line."""
    module_name, _, name = path.partition(":")
    require(
        bool(module_name and name),
        f"data.reward_fn {path!r} is not module:function: write it as, e.g., my_rewards:accuracy",
    )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ProbeConfigError(
            f"data.reward_fn {path!r}: module {module_name!r} does not import ({_one_line(err)}): put the folder "
            f"that holds it on PYTHONPATH and check that it imports"
        ) from err
    function = getattr(module, name, None)
    require(
        callable(function),
        f"data.reward_fn {path!r}: module {module_name!r} ({module.__file__}) has no function {name!r}: "
        f"name one of its functions",
    )
    return function


def reward_arguments(prompt: Prompt, columns: dict, texts: list[str], completion_ids: list[list[int]]) -> dict:
    """The keyword arguments of one prompt's G completions, as GRPOTrainer._calculate_rewards passes them."""
    G = len(texts)
    completions = [[{"role": "assistant", "content": text}] for text in texts] if is_conversational(prompt) else texts
    repeated = {name: [value] * G for name, value in columns.items()}
    return {"prompts": [prompt] * G, "completions": list(completions), "completion_ids": completion_ids, **repeated}


class RewardFunctions:
    """The run's reward functions with their names (as given, for messages) and weights."""

    def __init__(
        self,
        functions: list[RewardFunction] | None = None,
        names: list[str] | None = None,
        weights: list[float] | None = None,
    ):
        """functions: None, the built-in answer match on the `answer` column."""
        self.functions = [AnswerMatch()] if functions is None else list(functions)
        self.names = names or [f"{function.__module__}:{function.__name__}" for function in self.functions]
        self.configured_weights = None if weights is None else list(weights)  # as given; None: not given
        weights = [1.0] * len(self.functions) if weights is None else list(weights)
        require(
            len(weights) == len(self.functions),
            f"data.reward_weights has {len(weights)} weights for {len(self.functions)} reward functions "
            f"({', '.join(self.names)}): give one weight per data.reward_fn",
        )
        require(all(math.isfinite(w) for w in weights), f"data.reward_weights must be finite numbers, got {weights}")
        self.weights = torch.tensor(weights, dtype=torch.float32)  # as GRPOTrainer holds them

    @classmethod
    def from_flags(
        cls, reward_fn: list[str] | str | None, reward_weights: list[float] | None, answer_field: str = "answer"
    ) -> "RewardFunctions":
        """data.reward_fn's function(s), else the built-in answer match on the column data.answer_field."""
        if not reward_fn:
            return cls([AnswerMatch(answer_field)], weights=reward_weights)
        paths = [reward_fn] if isinstance(reward_fn, str) else list(reward_fn)
        return cls([load_reward_function(path) for path in paths], paths, reward_weights)

    @property
    def answer_columns(self) -> list[str]:
        """The columns the built-in answer match reads (each row needs a reference answer there)."""
        return [function.column for function in self.functions if isinstance(function, AnswerMatch)]

    def score(
        self, prompts: "PromptBatch", completions: list[list[str]], completion_ids: list[list[list[int]]]
    ) -> torch.Tensor:
        """[B, G] float32 rewards of a rollout batch's decoded responses, NaN where every function returned None."""
        rows = []  # [B][G][F]: TRL's rewards_per_func [B·G, F]
        for b, (prompt, columns) in enumerate(zip(prompts.prompts, prompts.columns)):
            arguments = reward_arguments(prompt, columns, completions[b], completion_ids[b])
            where = f"prompt {prompts.prompt_ids[b]} ({_start(prompts.questions[b])})"
            per_function = [self._call(i, arguments, len(completions[b]), where) for i in range(len(self.functions))]
            rows.append([list(completion) for completion in zip(*per_function)])
        values = torch.tensor(rows, dtype=torch.float32)
        rewards = (values * self.weights).nansum(dim=-1)
        unscored = values.isnan().all(dim=-1)
        rewards[unscored] = torch.nan
        if unscored.any():
            prompt_ids = [prompts.prompt_ids[b] for b in unscored.any(dim=1).nonzero().flatten().tolist()]
            log.warning(
                "%d completions of prompts %s: every reward function returned None; their advantage is 0, as in TRL",
                int(unscored.sum()), prompt_ids,
            )  # fmt: skip
        return rewards

    def _call(self, index: int, arguments: dict, G: int, where: str) -> list[float]:
        """Function `index` on one prompt's completions: G floats (NaN for None), or a one-line error."""
        name = self.names[index]
        try:  # a copy: a function that changes its arguments cannot change the probe's prompts or columns
            values = self.functions[index](**copy.deepcopy(arguments))
            if inspect.isawaitable(values):
                values = asyncio.run(_awaited(values))
        except Exception as err:
            raise ProbeConfigError(f"reward function {name} raised {_one_line(err)} on {where}: fix it") from err
        count = f"{len(values)} values" if hasattr(values, "__len__") else f"a {type(values).__name__}"
        require(
            hasattr(values, "__len__") and len(values) == G,
            f"reward function {name} returned {count} for the {G} completions of {where}: "
            f"return one float (or None) per completion",
        )
        return [_reward_value(value, name, g, where) for g, value in enumerate(values)]


def _reward_value(value, name: str, g: int, where: str) -> float:
    if value is None:
        return math.nan
    fix = "return a finite float, or None for a completion it does not score"
    try:
        number = None if isinstance(value, (str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = None
    require(number is not None, f"reward function {name} returned {value!r:.40} for completion {g} of {where}: {fix}")
    require(math.isfinite(number), f"reward function {name} returned {number} for completion {g} of {where}: {fix}")
    return number


def _start(text: str, length: int = 40) -> str:
    return repr(text) if len(text) <= length else f"{text[:length]!r}..."


async def _awaited(awaitable):
    return await awaitable


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"
