"""ProbeSums: one probe's ΣX, ΣY and counts; per-prompt losses are added to the sums by backward."""

from dataclasses import dataclass, fields

import torch

from probe_lightning.distributed import Collectives
from probe_lightning.estimators import dot64
from probe_lightning.token_scores import output_weight_gradients_into

NamedParams = list[tuple[str, torch.Tensor]]


@dataclass
class RoleCounts:
    """What one role's (E or U) rollouts of a probe held."""

    prompts: int = 0
    responses: int = 0
    tokens: int = 0
    scored_responses: int = 0  # responses with a reward (NaN: no reward function scored it)
    reward_sum: float = 0.0  # over the scored responses
    entropy_sum: float = 0.0  # Σ H_t over every response token
    mixed_prompts: int = 0  # prompts whose scored responses did not all get the same reward (non-zero advantages)


class ProbeSums:
    """ΣX = Σ_{p∈E} X(p) and ΣY = Σ_{p∈U} ∇J(p) in float32, with the counts of one probe (docs/math.md); with
    bonus, also ΣB = Σ_{p∈U} ∇(p's entropy bonus per unit coefficient), for the entropy_coef counterfactual (§9).
    """

    def __init__(self, named_params: NamedParams, bonus: bool = False):
        self.params = [p for _, p in named_params]

        def zeros():  # float32, or the parameters' own dtype where it is wider
            return [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in self.params]

        self.sum_x = zeros()
        self.sum_y = zeros()
        self.sum_b = zeros() if bonus else None
        self.counts = {"E": RoleCounts(), "U": RoleCounts()}
        # The U batch's scored rewards, flattened, NaN left out: their std is TRL's nanstd (scale_rewards batch).
        self.update_rewards: list[torch.Tensor] = []

    def add_gradient(
        self,
        sums: list[torch.Tensor] | None,
        loss: torch.Tensor,
        directions: list[list[torch.Tensor]] = (),
        retain_graph: bool = False,
    ) -> torch.Tensor:
        """sums += ∇loss, each parameter's gradient added as soon as backward completes it, then dropped;
        with directions, also ⟨∇loss, d⟩ for each, parameter by parameter (float64 [directions, parameters]: the
        per-tensor terms, whose sums over parameters are the dot products), taken from the same gradients.
        sums None: the gradient is only dotted with the directions, then dropped. retain_graph: the graph stays
        for a second loss of the same forward (the entropy bonus's, into ΣB).

        As in a plain loss.backward() into existing .grad, the whole gradient never exists at once
        (torch.autograd.grad would return all of it together: one more model-sized buffer at the peak);
        the output layer's weight gradient (head_token_scores) is added chunk by chunk into one scratch of
        the weight's size, not into a vocabulary-sized logits gradient. The parameters' own .grad are left as
        they were.
        """
        saved_grads = [p.grad for p in self.params]
        along = torch.zeros(len(directions), len(self.params), dtype=torch.float64)
        towards = [list(per_param) for per_param in zip(*directions)] or [[] for _ in self.params]
        sums = [None] * len(self.params) if sums is None else sums

        def add_into(total: torch.Tensor | None, toward: list[torch.Tensor], index: int):
            def hook(param: torch.Tensor) -> None:
                if param.grad is None:  # an output weight whose gradient went into its sum (_IntoSum)
                    return
                if total is not None:
                    total.add_(param.grad)
                for i, d in enumerate(toward):
                    along[i, index] += dot64(param.grad, d)
                param.grad = None

            return hook

        handles = [
            p.register_post_accumulate_grad_hook(add_into(total, toward, k))
            for k, (p, total, toward) in enumerate(zip(self.params, sums, towards, strict=True))
        ]
        sinks = {
            p: _IntoSum(p, total, toward, along[:, k])
            for k, (p, total, toward) in enumerate(zip(self.params, sums, towards))
        }
        try:
            for p in self.params:
                p.grad = None
            with output_weight_gradients_into(sinks):
                loss.backward(inputs=self.params, retain_graph=retain_graph)
        finally:
            for handle in handles:
                handle.remove()
            for p, grad in zip(self.params, saved_grads):
                p.grad = grad
        return along

    def count(self, role: str, rewards: torch.Tensor, token_entropies: torch.Tensor, response_mask: torch.Tensor):
        """Prompts, responses and tokens of one rollout ([B, G] rewards, [B, G, R] entropies and mask)."""
        counts = self.counts[role]
        counts.prompts += rewards.shape[0]
        counts.responses += rewards.numel()
        counts.tokens += int(response_mask.sum().item())
        scored = rewards[~rewards.isnan()]
        counts.scored_responses += scored.numel()
        counts.reward_sum += scored.sum().item()
        counts.entropy_sum += token_entropies.sum().item()
        highest, lowest = rewards.nan_to_num(nan=-torch.inf).amax(1), rewards.nan_to_num(nan=torch.inf).amin(1)
        counts.mixed_prompts += int((highest > lowest).sum().item())
        if role == "U":
            self.update_rewards.append(scored)

    @property
    def reward_mean(self) -> float:
        """Over every scored response of the probe, E and U (TRL's nanmean); NaN if none was scored."""
        e, u = self.counts["E"], self.counts["U"]
        scored = e.scored_responses + u.scored_responses
        return (e.reward_sum + u.reward_sum) / scored if scored else float("nan")

    @property
    def entropy_mean(self) -> float:
        """Mean per-token entropy of q over every response token of the probe, E and U."""
        e, u = self.counts["E"], self.counts["U"]
        return (e.entropy_sum + u.entropy_sum) / max(e.tokens + u.tokens, 1)

    def all_reduce(self, collectives: Collectives) -> None:
        """With several processes, ΣY (ΣB) and the counts become their totals over all of them (SUM, never a
        mean); ΣX is summed after the E pass, which needs Ȳ and the E counts first."""
        if not collectives.active:
            return
        collectives.sum_(self.sum_y)
        if self.sum_b is not None:
            collectives.sum_(self.sum_b)
        names = [f.name for f in fields(RoleCounts)]
        totals = torch.tensor([float(getattr(self.counts[r], n)) for r in "EU" for n in names], dtype=torch.float64)
        collectives.sum_([totals])
        for value, (role, name) in zip(totals.tolist(), [(r, n) for r in "EU" for n in names]):
            kind = type(getattr(self.counts[role], name))
            setattr(self.counts[role], name, round(value) if kind is int else value)
        self.update_rewards = [r.cpu() for r in collectives.gather(torch.cat(self.update_rewards).cpu())]


class _IntoSum:
    """Where the output layer's backward adds its weight's gradient, chunk by chunk: a zero scratch of the weight's
    size, which leaves gives its dot product with each direction (into along, this parameter's column) and is added
    into the sum (if one is kept). Dotting the gradient itself, not the sum's change, keeps a prompt's a_e
    independent of what the float32 sum held before it."""

    def __init__(
        self, param: torch.Tensor, total: torch.Tensor | None, toward: list[torch.Tensor], along: torch.Tensor
    ):
        self.param, self.total, self.toward, self.along = param, total, toward, along

    def __enter__(self) -> torch.Tensor:
        self.scratch = torch.zeros_like(self.param, dtype=torch.promote_types(self.param.dtype, torch.float32))
        return self.scratch

    def __exit__(self, *exc) -> None:
        for i, d in enumerate(self.toward):
            self.along[i] += dot64(self.scratch, d)
        if self.total is not None:
            self.total.add_(self.scratch)
        self.scratch = None
