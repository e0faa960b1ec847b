"""Reward functions as a user writes them for TRL's GRPOTrainer, named on the tests' command lines
(`--data.reward_fn user_rewards:NAME`; tests/ is on sys.path)."""


def token_sum(prompts, completions, completion_ids, **columns):
    """Each completion's token ids added up: a number that differs from response to response."""
    return [float(sum(ids)) for ids in completion_ids]


def fails(prompts, completions, **columns):
    return [1.0 / (len(completion) - len(completion)) for completion in completions]


NOT_A_FUNCTION = 3


def even_token_sum(prompts, completions, completion_ids, **columns):
    """token_sum where it is even; None (not scored) where it is odd."""
    return [float(sum(ids)) if sum(ids) % 2 == 0 else None for ids in completion_ids]


def never_scores(prompts, completions, **columns):
    """None for every completion: nothing is scored."""
    return [None for _ in completions]
