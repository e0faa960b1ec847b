"""How responses are sampled: the settings of q, and a sampler whose draws depend on their seeds only.

q (docs/math.md) is softmax(z / temperature), then top-p truncation: transformers' own warpers, in
generate's order, so teacher forcing and generation agree.
"""

from dataclasses import dataclass, field

import torch
import transformers
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from probe_lightning.config import require


@dataclass
class GenerationConfig:
    """How responses are sampled. pad/eos ids left as None are taken from the tokenizer."""

    max_new_tokens: int | None = None  # TRL's max_completion_length; None: the checkpoint's, else 64
    temperature: float = 1.0
    top_p: float = 1.0
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    gen_batch_size: int = 32  # sequences per generation call (whole prompts: at least G)
    # Sequences per teacher-forcing forward. A forward holds whole prompts (all G responses, so a
    # group's baseline sees its group): tf_batch_size // G prompts, at least one.
    tf_batch_size: int = 16
    stop_strings: list[str] = field(default_factory=list)  # a response ends after any of these

    def __post_init__(self):
        require(self.temperature > 0, f"generation.temperature must be > 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"generation.top_p must be in (0, 1], got {self.top_p}")
        require(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}",
        )
        require(self.gen_batch_size >= 1, f"generation.gen_batch_size must be >= 1, got {self.gen_batch_size}")
        require(self.tf_batch_size >= 1, f"generation.tf_batch_size must be >= 1, got {self.tf_batch_size}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def logits_warper(self) -> LogitsProcessorList:
        """z -> scores of q, exactly as model.generate builds them (temperature first, then top-p)."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers

    def to_hf(self) -> transformers.GenerationConfig:
        # top_k=0 and the neutral values override transformers' defaults (top_k=50!), which would
        # otherwise make generation sample from a distribution teacher forcing does not know about.
        return transformers.GenerationConfig(
            do_sample=True,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,
            typical_p=1.0,
            repetition_penalty=1.0,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            stop_strings=self.stop_strings or None,
        )


class SeededSampler:
    """Draws from q by inverse CDF, one uniform number per row and step from the row's own generator.

    A row's draws depend only on its seed and on q, not on the other rows of the batch, nor on which of
    them are still generating. The CDF is summed in float64 and a draw never lands on a token of q = 0.
    """

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]

    def draw(self, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[n] tokens, one from each row of the [n, V] probabilities q, for the sampler rows `rows`."""
        u = torch.cat([torch.rand(1, generator=self.generators[r], dtype=torch.float64, device=q.device)
                       for r in rows.tolist()])  # fmt: skip
        cdf = q.double().cumsum(-1)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        last_possible = (q > 0).cumsum(-1).argmax(-1)  # where a u rounding up to the total mass must stop
        return torch.minimum(picks, last_possible)


class SeededDraws:
    """SeededSampler as a logits processor of model.generate: every score but the drawn token's is set to
    −inf, so generate's greedy choice is the draw (what the bench's bare minimum samples with)."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.sampler = SeededSampler(seeds, device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(scores.shape[0], device=scores.device)
        tokens = self.sampler.draw(scores.float().softmax(-1), rows)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens[:, None], 0.0)
