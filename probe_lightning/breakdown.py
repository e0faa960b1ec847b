"""The standard errors of δH₁'s breakdown (docs/math.md §9, model.breakdown_se and model.top_contributions_se): of
each counterfactual token selection, of each parameter tensor's and block's share, and of each top response's and
token's contribution. Each is §6's plug-in restricted to its number; each needs a pass of its own, so they live
apart from the probe's estimate, as methods the Probe inherits (they read its sums, batches and settings).
"""

import math

import torch

from probe_lightning.contributions import response_key, select_tokens
from probe_lightning.directional import token_derivatives
from probe_lightning.progress import phase_bar
from probe_lightning.results import ProbeResult
from probe_lightning.rollout import Rollout
from probe_lightning.sequence_processor import BatchedSequences, TeacherForcing
from probe_lightning.vectors import share_standard_errors


class BreakdownErrors:
    """Probe's passes for the breakdown's standard errors."""

    def _token_selections(self) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
        """The counterfactual token selections (contributions.select_tokens) over every U token of the probe, all
        processes together, in the tables' order; as a keep mask per U response, keyed (prompt id, response)."""
        local = []
        for micro, tf in self._update_scored():
            lengths = micro.batch.response_mask.sum(-1).tolist()
            for b, prompt_id in enumerate(micro.prompt_ids):
                for g, n in enumerate(lengths[b]):
                    scores = (tf.token_entropies[b, g, :n], tf.token_logprobs[b, g, :n])
                    local.append(((prompt_id, g), *[x.double().cpu() for x in scores], micro.advantages[b, g].item()))
        responses = sorted((r for share in self.collectives.gather(local) for r in share), key=lambda r: r[0])
        if not any(len(r[1]) for r in responses):  # every U response is empty: nothing to select
            return {}
        entropy, log_q = (torch.cat([r[k] for r in responses]) for k in (1, 2))
        advantage = torch.cat([torch.full_like(r[1], r[3]) for r in responses])
        lengths = [len(r[1]) for r in responses]
        return {
            name: dict(zip([r[0] for r in responses], keep.split(lengths)))
            for name, keep in select_tokens(entropy, log_q, advantage).items()
        }

    def _selection_directions(self, grad_j: list[torch.Tensor], update_scale: float) -> dict[str, list[torch.Tensor]]:
        """Each counterfactual selection's step, to first order: (∂Ȳ/∂∇J) ĝ_S, ĝ_S the clipped ∇J̄'s piece from the
        selected tokens (as their contributions add it up: update_scale / B_U times ∇ Σ_{t∈S} (c log q + c_H H_t)).
        One more teacher forcing of the U batch with a backward per selection from the same forward, each over the
        smaller side: the selected tokens, or the removed ones taken from ∇J̄ (a side in few responses: a forward and
        backward of just those). The E pass takes them as directions
        ("selection/NAME"; "all" is Ȳ's own linearisation: y_bar, or _estimate's gradient_step for adamw_step)."""
        if not self.selections:
            return {}
        names = [name for name in self.selections if name != "all"]
        tokens = sum(len(keep) for keep in self.selections["all"].values())
        kept = {name: sum(int(keep.sum()) for keep in self.selections[name].values()) for name in names}
        removed = {name: 2 * kept[name] > tokens for name in names}  # backward the removed tokens instead
        sums = {name: [torch.zeros_like(g) for g in grad_j] for name in names}
        bonus = self.has_bonus_term

        def add(name: str, tf: TeacherForcing, coefficients, masks, retain_graph: bool = False) -> None:
            c, c_h = coefficients
            loss = (c * masks[name] * tf.token_logprobs).sum()
            if bonus:
                loss = loss + (c_h * masks[name] * tf.token_entropies).sum()
            self.sums.add_gradient(sums[name], loss, retain_graph=retain_graph)

        def selection_pass():
            for micro, scored in phase_bar("selection steps", "microbatch", iterable=self._update_scored()):
                masks = {name: self._keep_mask(micro, self.selections[name], removed[name]) for name in names}
                touched = {name: masks[name].amax(-1) > 0 for name in names}  # [B, G]: responses with such tokens
                coefficients = self.update_batch.coefficients(micro, scored.token_logprobs)
                # A side spread over most responses: one more forward of the microbatch, a backward each. A few
                # responses (Clip-Cov's and KL-Cov's tokens): a forward and backward of just those responses.
                shared = [name for name in names if 2 * touched[name].sum() > touched[name].numel()]
                if shared:
                    tf = self.processor.teacher_force_logprobs(micro.batch, with_grad=True)
                    with torch.enable_grad():
                        for i, name in enumerate(shared):
                            add(name, tf, coefficients, masks, retain_graph=i + 1 < len(shared))
                for name in names:
                    if name in shared or not touched[name].any():
                        continue
                    b, g = touched[name].nonzero().unbind(1)
                    tf = self.processor.teacher_force_logprobs(
                        micro.batch.responses(list(zip(b.tolist(), g.tolist()))), with_grad=True
                    )
                    picked = [None if c is None else c[b, g][:, None] for c in coefficients]
                    with torch.enable_grad():
                        add(name, tf, picked, {name: masks[name][b, g][:, None]})

        self._unless_failed(selection_pass)
        self.collectives.raise_any(self.failure)
        B_U = self.sums.counts["U"].prompts
        directions = {}
        for name in names:
            total = sums.pop(name)
            self.collectives.sum_(total)
            piece = [s.mul_(update_scale / B_U) for s in total]
            if removed[name]:
                piece = [g - s for g, s in zip(grad_j, piece)]
            directions[f"selection/{name}"] = self.step_derivative(piece)
        return directions

    @staticmethod
    def _keep_mask(micro: Rollout, selection: dict[tuple[int, int], torch.Tensor], invert: bool) -> torch.Tensor:
        """[B, G, R] the selection's tokens of a U microbatch (the ones it removes, with invert)."""
        mask = torch.zeros_like(micro.batch.response_mask, dtype=torch.float32)
        for b, prompt_id in enumerate(micro.prompt_ids):
            for g in range(micro.batch.num_responses_per_prompt):
                keep = selection[(prompt_id, g)]
                mask[b, g, : len(keep)] = (~keep if invert else keep).float()
        return mask

    def _share_standard_errors(self, result: ProbeResult, direction: list[torch.Tensor]) -> None:
        """The plug-in SE of each parameter tensor's and each block's share of δH₁ (docs/math.md §9): the E side from
        the E pass's per-tensor ⟨X(e), Ȳ⟩, the U side b_u per tensor, ⟨v_k, ∇J(p_u)_k⟩, from one more backward per
        U prompt whose gradient is only dotted with v (forward mode would need a pass per block)."""

        def update_terms() -> list[torch.Tensor]:
            rows = []
            for micro, _ in phase_bar("share SE", "microbatch", iterable=self._update_scored()):
                for b in range(micro.batch.num_prompts):
                    one = micro.select(slice(b, b + 1))
                    tf = self.processor.teacher_force_logprobs(one.batch, with_grad=True)
                    with torch.enable_grad():
                        loss = self.update_loss(one, tf).sum()
                        rows.append(self.sums.add_gradient(None, loss, [direction])[0] * self.vectors.update_scale)
            return rows

        rows = self._unless_failed(update_terms)
        self.collectives.raise_any(self.failure)
        shares = self.collectives.gather((self.entropy_parameter_terms, rows))
        entropy_terms = torch.stack([t for share in shares for t in share[0]])
        update_terms = torch.stack([t for share in shares for t in share[1]])
        result.parameter_shares_se, result.block_shares_se = share_standard_errors(
            self.weight_keys, entropy_terms, update_terms, self.geometry.scale
        )

    def _top_standard_errors(self, result: ProbeResult) -> None:
        """The SE of each top response's and top token's contribution (docs/math.md §9). Given the U sample an item's
        contribution d varies with X̄ only: d is the mean over E prompts of d(e), d with X(e) in place of X̄, so its SE
        is sd(d(e)) / sqrt(B_E). One more E pass gives each X(e) (a backward per E prompt into a scratch sum); one
        forward-mode pass over the top items' responses along (∂Ȳ/∂∇J)ᵀ X(e) gives their tokens' d(e)."""
        vectors, params = self.vectors, [p for _, p in self.named_params]
        items = [(r["key"], None) for r in result.top_responses] + [
            (t["key"], t["position"]) for t in result.top_tokens
        ]
        if not items:
            return
        device = params[0].device
        shares = self.collectives.gather(self._responses_of({key for key, _ in items}))
        keys = [key for share in shares for key in share[0]]
        batches = [batch.to(device) for share in shares for batch in share[1]]
        coefficients = [c.to(device) for share in shares for c in share[2]]
        scale = self.geometry.scale * vectors.update_scale / result.B_U

        def per_entropy_prompt() -> list[list[float]]:
            scratch, values = [torch.zeros_like(s) for s in self.sums.sum_x], []
            prompts = [
                rollout.select(slice(b, b + 1)) for rollout in self.held for b in range(rollout.batch.num_prompts)
            ]
            for micro in phase_bar("top contributions' SE", "prompt", iterable=prompts):
                tf = self.processor.teacher_force_logprobs(micro.batch, with_grad=True)
                for s in scratch:
                    s.zero_()
                with torch.enable_grad():
                    self.sums.add_gradient(scratch, self.entropy_loss(micro, tf))
                along = self.step_derivative(scratch)
                derivatives = token_derivatives(self.processor, self.named_params, batches, along)
                # d(e) per token of each response: its coefficients times the derivatives of log q and H_t
                tokens = torch.cat([(c * d).sum(0).flatten(0, 1) for c, d in zip(coefficients, derivatives)]) * scale
                by_key = dict(zip(keys, tokens))
                values.append([(by_key[k].sum() if t is None else by_key[k][t]).item() for k, t in items])
            return values

        values = self._unless_failed(per_entropy_prompt)
        self.collectives.raise_any(self.failure)
        values = torch.tensor([v for share in self.collectives.gather(values) for v in share], dtype=torch.float64)
        se = values.std(0) / math.sqrt(len(values)) if len(values) > 1 else torch.full((len(items),), math.nan)
        for row, item_se in zip(result.top_responses + result.top_tokens, se.tolist()):
            row["se"] = item_se

    def _responses_of(self, keys: set[str]) -> tuple[list[str], list[BatchedSequences], list[torch.Tensor]]:
        """This process's U responses named by keys, per microbatch: their keys, the responses as a batch (on the
        CPU, to be gathered) and their coefficients [2, n, 1, R] (of log q, of H_t: 0 without an entropy bonus)."""
        names, batches, coefficients = [], [], []
        for micro, scored in self._update_scored():
            pairs = [(b, g) for b, prompt_id in enumerate(micro.prompt_ids)
                     for g in range(micro.batch.num_responses_per_prompt)
                     if response_key(micro.prompts.probe_index, "U", prompt_id, g) in keys]  # fmt: skip
            if not pairs:
                continue
            c, c_h = self.update_batch.coefficients(micro, scored.token_logprobs)
            c_h = c_h if c_h is not None and self.has_bonus_term else torch.zeros_like(c)
            b, g = (torch.tensor(index) for index in zip(*pairs))
            names.extend(response_key(micro.prompts.probe_index, "U", micro.prompt_ids[i], j) for i, j in pairs)
            batches.append(micro.batch.responses(pairs).to("cpu"))
            coefficients.append(torch.stack([c[b, g], c_h[b, g]])[:, :, None].double().cpu())
        return names, batches, coefficients
