"""Which samples drive δH₁: contributions per E prompt, per U token (adding up to δH₁), the tables users
open, and counterfactual token selections (docs/math.md "Contributions down to tokens").

For a linear geometry δH₁ = Σ_{u,g,t} d_{u,g,t} with d = η c_{u,g,t} ⟨P ⊙ X̄, ∇log q(y_{u,g,t})⟩, and
equally δH₁ = Σ_e η a_e / B_E; with adamw_step both add up to the step linearised at the clipped ∇J̄.
"""

from dataclasses import dataclass, field

import torch

from probe_lightning.estimators import plugin_standard_error, standard_error_parts
from probe_lightning.rollout import Rollout
from probe_lightning.trainer_loss import entropy_threshold
from probe_lightning.true_change import token_covariances

# Cui et al. 2025 (their verl defaults): Clip-Cov detaches clip_cov_ratio of the tokens, drawn from those
# whose centred covariance lies in [lb, ub]; KL-Cov puts a KL penalty on the top kl_cov_ratio by covariance.
CLIP_COV_RATIO, CLIP_COV_BOUNDS, KL_COV_RATIO = 2e-4, (1.0, 5.0), 2e-4
TOP_ENTROPY_QUANTILES = (0.2, 0.5)
TOP = 10


@dataclass
class ProbeContributions:
    """One probe's samples with their shares of δH₁, as the rows of its two tables."""

    probe_index: int
    responses: list[dict] = field(default_factory=list)  # one row per E and U response
    tokens: list[dict] = field(default_factory=list)  # one row per E and U response token

    def add_rollout(self, rollout: Rollout, per_response, per_token, token_logprobs, token_entropies, tokenizer):
        """per_response [B, G] and per_token [B, G, R] in nats; both None for E responses (X has no token-level
        split, and the E pass gives one derivative per prompt: its share is in entropy_prompt_contributions)."""
        batch = rollout.batch
        P, mask = batch.prompt_len, batch.response_mask.bool()
        for b, prompt_id in enumerate(rollout.prompt_ids):
            for g in range(batch.num_responses_per_prompt):
                key = response_key(rollout.prompts.probe_index, rollout.role, prompt_id, g)
                length = int(mask[b, g].sum())
                ids = batch.sequences[b, g, P : P + length].tolist()
                texts = tokenizer.batch_decode([[i] for i in ids])
                entropies = token_entropies[b, g, :length]
                self.responses.append({
                    "key": key, "probe": self.probe_index, "role": rollout.role, "prompt_id": prompt_id,
                    "response": g, "question": rollout.prompts.questions[b],
                    "response_text": batch.responses_text[b][g],
                    "reward": rollout.rewards[b, g].item(), "advantage": rollout.advantages[b, g].item(),
                    "length": length, "S": token_logprobs[b, g, :length].sum().item(),
                    "mean_token_entropy": entropies.mean().item() if length else 0.0,
                    "contribution": None if per_response is None else per_response[b, g].item(),
                })  # fmt: skip
                for t in range(length):
                    self.tokens.append({
                        "key": key, "probe": self.probe_index, "role": rollout.role, "position": t,
                        "token_id": ids[t], "token": texts[t],
                        "log_q": token_logprobs[b, g, t].item(), "entropy": entropies[t].item(),
                        "advantage": rollout.advantages[b, g].item(),
                        "contribution": None if per_token is None else per_token[b, g, t].item(),
                    })  # fmt: skip

    @classmethod
    def merge(cls, parts: list["ProbeContributions"]) -> "ProbeContributions":
        """Several processes' rows as one probe's, in one order whatever the number of processes."""
        merged = cls(parts[0].probe_index)
        for part in parts:
            merged.responses.extend(part.responses)
            merged.tokens.extend(part.tokens)
        merged.responses.sort(key=_sample_order)
        merged.tokens.sort(key=lambda token: (*_sample_order(token), token["position"]))
        return merged

    def top_responses(self) -> list[dict]:
        """The TOP responses by |contribution|, each with its tokens (for the report)."""
        scored = [r for r in self.responses if r["contribution"] is not None]
        top = sorted(scored, key=lambda r: -abs(r["contribution"]))[:TOP]
        by_key = {}
        for token in self.tokens:
            by_key.setdefault(token["key"], []).append(token)
        return [{**r, "tokens": by_key.get(r["key"], [])} for r in top]

    def top_tokens(self) -> list[dict]:
        scored = [t for t in self.tokens if t["contribution"] is not None]
        return sorted(scored, key=lambda t: -abs(t["contribution"]))[:TOP]

    def counterfactuals(
        self, selections: dict[str, dict[tuple[int, int], torch.Tensor]], update_ids: list[int], scale: float,
        entropy_terms: dict[str, torch.Tensor],
    ) -> dict[str, dict]:  # fmt: skip
        """δH₁ of the step trained only on each token selection (select_tokens, as a keep mask per U response
        keyed (prompt id, response)): the sum of the kept U tokens' contributions (the trainer's normaliser
        unchanged, as TRL applies its entropy mask), with its plug-in SE (docs/math.md §9) from each E prompt's
        a_e(S) = ⟨X(e), the selection's step⟩ (entropy_terms[name], from the E pass) and each U prompt's share
        of the kept tokens (update_ids: every U prompt, those without tokens too); likewise for the removed ones."""
        update = [t for t in self.tokens if t["role"] == "U"]
        if not update or not selections:
            return {}
        d = torch.tensor([t["contribution"] for t in update], dtype=torch.float64)
        responses = [_key_parts(t["key"])[1:] for t in update]
        prompt_of = torch.tensor([update_ids.index(prompt_id) for prompt_id, _ in responses])
        B_U = len(update_ids)

        def per_prompt(mask: torch.Tensor) -> torch.Tensor:  # b_u(S): a U prompt's kept share, in b_u's units
            shares = torch.zeros(B_U, dtype=torch.float64).index_add_(0, prompt_of[mask], d[mask])
            return shares * B_U / scale

        entries = {}
        for name, keep in selections.items():
            mask = torch.tensor([bool(keep[r][t["position"]]) for r, t in zip(responses, update)])
            a_kept, b_kept = entropy_terms[name], per_prompt(mask)
            a_removed, b_removed = entropy_terms["all"] - a_kept, per_prompt(~mask)
            entries[name] = {
                "delta_h1": d[mask].sum().item(), "tokens": int(mask.sum()), "fraction": mask.float().mean().item(),
                "se": plugin_standard_error(a_kept, b_kept, scale),
                "se_parts": standard_error_parts(a_kept, b_kept, scale),
                "removed_delta_h1": d[~mask].sum().item(),
                "removed_se": plugin_standard_error(a_removed, b_removed, scale),
            }  # fmt: skip
        return entries


def select_tokens(entropy: torch.Tensor, log_q: torch.Tensor, advantage: torch.Tensor, seed: int = 0) -> dict:
    """The counterfactual token selections over a U batch's tokens (flat, in the tables' order): {name: keep mask}.
    TRL's top_entropy_quantile ρ keeps H_t >= the (1 − ρ) quantile; Clip-Cov drops CLIP_COV_RATIO of the tokens,
    drawn from those whose centred covariance lies in CLIP_COV_BOUNDS; KL-Cov the top KL_COV_RATIO by covariance."""
    keep = {"all": torch.ones_like(entropy, dtype=torch.bool)}
    for rho in TOP_ENTROPY_QUANTILES:
        keep[f"top_entropy_{rho}"] = entropy >= entropy_threshold(entropy, rho)
    covariance = token_covariances(log_q, advantage)
    band = ((covariance >= CLIP_COV_BOUNDS[0]) & (covariance <= CLIP_COV_BOUNDS[1])).nonzero().flatten()
    clip_count = min(max(int(CLIP_COV_RATIO * len(entropy)), 1), len(band))
    chosen = band[torch.randperm(len(band), generator=torch.Generator().manual_seed(seed))[:clip_count]]
    keep["clip_cov"] = torch.ones_like(keep["all"]).index_fill_(0, chosen, False)
    top_k = covariance.topk(max(int(KL_COV_RATIO * len(entropy)), 1)).indices
    # KL-Cov's penalty has no gradient on-policy (ratio 1): its first step trains on every token; the
    # selection is the step without the selected tokens, the limit of a strong penalty.
    keep["kl_cov"] = torch.ones_like(keep["all"]).index_fill_(0, top_k, False)
    return keep


def response_key(probe_index: int, role: str, prompt_id: int, response: int) -> str:
    """A response's key in the tables: "probe/role/prompt_id/response"."""
    return f"{probe_index}/{role}/{prompt_id}/{response}"


def _key_parts(key: str) -> tuple[str, int, int]:
    """(role, prompt id, response index) from a response's key."""
    _, role, prompt_id, response = key.split("/")
    return role, int(prompt_id), int(response)


def _sample_order(row: dict) -> tuple[int, int, int]:
    """(role, prompt id, response index) of a row, roles in the order E, V, U."""
    role, prompt_id, response = _key_parts(row["key"])
    return "EVU".index(role), prompt_id, response
