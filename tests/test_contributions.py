"""Which samples drive δH₁: per-sample contributions add up to it, a counterfactual token selection
predicts the probe run whose update loss trains only on those tokens, and the terms of the counterfactuals' and the
parameter shares' standard errors add up to the probe's own, by two routes."""

import math

import pytest
import torch
from enumerable_world import PROMPTS
from eos_world import save_eos_world
from probe_helpers import head_adam_state, make_probe, prompt_batches

from probe_lightning import breakdown
from probe_lightning.config import TrainerConfig
from probe_lightning.contributions import ProbeContributions
from probe_lightning.directional import directional_derivatives
from probe_lightning.probe import Probe
from probe_lightning.vectors import share_standard_errors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eos_world(tmp_path_factory) -> str:
    return save_eos_world(tmp_path_factory.mktemp("eos_world"))


def run(world, seed=13, **settings):
    probe = make_probe(world, G=3, G_E=3, entropy_target="token_mean", estimator="rb", dtype=torch.float64, **settings)
    batches = prompt_batches(0, PROMPTS * 2, PROMPTS * 2, rollout_batch_size=3, seed=seed)
    outputs = [probe.step(batch) for batch in batches]
    return outputs[-1]


@pytest.mark.parametrize("update", ["identity", "adam_precondition"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "seed"])
def test_token_and_entropy_prompt_contributions_add_up_to_delta_h1(eos_world, tmp_path, loss_type, update):
    state = None
    if update == "adam_precondition":  # a real AdamW state of the output layer
        state = head_adam_state(tmp_path / "optimizer.pt")
    out = run(eos_world, optimizer_state=state and str(state), update=update,
              trainer=TrainerConfig(loss_type=loss_type, max_grad_norm=0.5))  # fmt: skip
    result, tables = out.finished, out.contributions
    assert result.contributions_add_up_to == "delta_h1" and result.delta_h1 != 0
    tokens = [t["contribution"] for t in tables.tokens if t["role"] == "U"]
    for parts in (tokens, list(result.entropy_prompt_contributions.values())):
        assert abs(sum(parts) - result.delta_h1) <= 1e-6 * abs(result.delta_h1)
    responses = [r["contribution"] for r in tables.responses if r["role"] == "U"]
    assert sum(responses) == pytest.approx(result.delta_h1, rel=1e-6)
    assert all(r["contribution"] is None for r in tables.responses if r["role"] == "E")  # E's are per prompt
    assert result.counterfactuals["all"]["delta_h1"] == pytest.approx(result.delta_h1, rel=1e-6)
    everything = result.counterfactuals["all"]  # a linear geometry: the whole selection's SE is δH₁'s
    assert everything["se"] == pytest.approx(result.delta_h1_se, rel=1e-6)
    assert everything["se_parts"] == pytest.approx(result.delta_h1_se_parts, rel=1e-6)
    assert sum(result.block_shares.values()) == pytest.approx(result.delta_h1, rel=1e-6)
    assert result.block_shares_se.keys() == result.block_shares.keys()


@pytest.mark.parametrize("update", ["identity", "adamw_step"])
def test_the_counterfactuals_and_shares_standard_errors_come_from_terms_that_add_up_two_ways(
    eos_world, tmp_path, monkeypatch, update
):
    """Each selection's E side a_e(S) = ⟨X(e), its step⟩ comes from the E pass (a backward over the selected U
    tokens, then a dot product); its mean is the sum of the selected tokens' forward-mode contributions. Each tensor's
    U side, from a backward per U prompt, adds up to b_u of the forward-mode pass; its E side to a_e."""
    seen = {}
    counterfactuals = ProbeContributions.counterfactuals

    def recording(self, selections, update_ids, scale, entropy_terms):
        seen["selection"] = (scale, entropy_terms)
        return counterfactuals(self, selections, update_ids, scale, entropy_terms)

    def shares(keys, entropy_terms, update_terms, scale):
        seen["shares"] = (entropy_terms, update_terms)
        return share_standard_errors(keys, entropy_terms, update_terms, scale)

    monkeypatch.setattr(ProbeContributions, "counterfactuals", recording)
    monkeypatch.setattr(breakdown, "share_standard_errors", shares)
    state = str(head_adam_state(tmp_path / "optimizer.pt")) if update == "adamw_step" else None
    out = run(eos_world, optimizer_state=state, update=update, learning_rate=0.1,
              trainer=TrainerConfig(loss_type="dapo", max_grad_norm=0.5))  # fmt: skip
    result = out.finished
    scale, entropy_terms = seen["selection"]
    assert set(entropy_terms) == {"all", "top_entropy_0.2", "top_entropy_0.5", "clip_cov", "kl_cov"}
    for name, entry in result.counterfactuals.items():
        if name in entropy_terms:
            assert scale * entropy_terms[name].mean().item() == pytest.approx(entry["delta_h1"], rel=1e-6, abs=1e-12)
            assert 0 < entry["se"] < math.inf and entry["tokens"] > 0
    kept = result.counterfactuals["top_entropy_0.2"]
    assert kept["removed_delta_h1"] + kept["delta_h1"] == pytest.approx(result.counterfactuals["all"]["delta_h1"])
    per_tensor_e, per_tensor_u = seen["shares"]
    B_E, B_U = result.B_E, result.B_U
    assert per_tensor_u.shape == (B_U, len(result.parameter_shares))
    by_prompt_u = per_tensor_u.sum(1) * scale / B_U
    assert by_prompt_u.tolist() == pytest.approx(list(result.update_prompt_contributions.values()), rel=1e-6)
    by_prompt_e = per_tensor_e.sum(1) * scale / B_E
    assert by_prompt_e.tolist() == pytest.approx(list(result.entropy_prompt_contributions.values()), rel=1e-6)
    assert per_tensor_e.sum(0).mul(scale / B_E).tolist() == pytest.approx(list(result.parameter_shares.values()))
    assert all(0 < se < math.inf for se in result.block_shares_se.values())


def test_a_top_contributions_se_is_its_spread_over_the_entropy_prompts_taken_one_at_a_time(eos_world):
    """Given the U sample, a token's contribution is the mean over E prompts of the contribution a probe with that
    E prompt alone gives it (the budget target: X(p) does not depend on the other E prompts); its SE is their
    spread / sqrt(B_E). Probes of one E prompt each give both, independently of the probe's own pass."""
    settings = dict(G=3, G_E=3, entropy_target="budget", estimator="rb", dtype=torch.float64, top_contributions_se=True,
                    trainer=TrainerConfig(loss_type="dapo", max_grad_norm=0.5))  # fmt: skip
    batches = prompt_batches(0, PROMPTS * 2, PROMPTS * 2, rollout_batch_size=3, seed=13)
    entropy, update = [b for b in batches if b.role == "E"], [b for b in batches if b.role == "U"]
    probe = make_probe(eos_world, **settings)
    result = [probe.step(batch) for batch in batches][-1].finished
    alone = []
    for batch in entropy:
        for i in range(len(batch.prompt_ids)):
            one = batch.select(slice(i, i + 1))
            probe = make_probe(eos_world, **settings)
            tables = [probe.step(b) for b in [one, *update]][-1].contributions
            alone.append({(t["key"], t["position"]): t["contribution"] for t in tables.tokens if t["role"] == "U"})
    assert len(alone) == result.B_E == len(PROMPTS) * 2 and len(result.top_tokens) == 10
    for token in result.top_tokens:
        values = torch.tensor([a[(token["key"], token["position"])] for a in alone], dtype=torch.float64)
        assert values.mean().item() == pytest.approx(token["contribution"], rel=1e-6)
        assert token["se"] == pytest.approx((values.std() / math.sqrt(len(values))).item(), rel=1e-6)
    for response in result.top_responses:
        values = torch.tensor([sum(v for (key, _), v in a.items() if key == response["key"]) for a in alone])
        assert response["se"] == pytest.approx((values.std() / math.sqrt(len(values))).item(), rel=1e-6)


@pytest.mark.parametrize("entropy_target", ["token_mean", "budget"])
def test_each_entropy_prompt_share_is_the_forward_mode_derivative_of_its_loss_along_y_bar(eos_world, entropy_target):
    """a_e comes from the E pass's own gradient (a dot product with Ȳ); forward-mode AD of each prompt's
    loss along Ȳ gives the same numbers."""
    probe = make_probe(eos_world, G=3, G_E=3, entropy_target=entropy_target, estimator="rb", dtype=torch.float64,
                       trainer=TrainerConfig(loss_type="dapo", max_grad_norm=0.5))  # fmt: skip
    batches = prompt_batches(0, PROMPTS * 2, PROMPTS * 2, 3, seed=5)
    result, vectors = [probe.step(batch) for batch in batches][-1].finished, probe.vectors
    entropy_batch = [probe.make_rollout(batch) for batch in batches if batch.role == "E"]  # the same samples
    weights = torch.tensor(vectors.x_weights, dtype=torch.float64)
    derivatives = directional_derivatives(
        probe.processor, probe.named_params, entropy_batch, vectors.y_bar,
        lambda micro, tf: probe.entropy_terms(micro, tf) @ weights,
    )  # fmt: skip
    expected = {i: a for micro, d in derivatives for i, a in zip(micro.prompt_ids, d.mean(1).tolist())}
    scale = probe.geometry.scale / result.B_E
    shares = {i: share / scale for i, share in result.entropy_prompt_contributions.items()}
    assert len(shares) == len(PROMPTS) * 2 and shares.keys() == expected.keys()
    for i, a in expected.items():
        assert shares[i] == pytest.approx(a, rel=1e-9, abs=1e-12)


def test_with_the_adamw_step_contributions_add_up_to_the_linearised_step(eos_world, tmp_path):
    out = run(eos_world, optimizer_state=str(head_adam_state(tmp_path / "optimizer.pt")), learning_rate=0.1)
    assert out.finished.contributions_add_up_to == "the linearised step"
    assert out.results.to_dict()["update"] == "adamw_step"


class MaskedProbe(Probe):
    """The same probe, but the update loss trains only on U tokens with H_t >= THRESHOLD."""

    threshold = 0.0

    def update_loss(self, rollout, tf):
        keep = (tf.token_entropies.detach().double() >= self.threshold).to(tf.token_logprobs.dtype)
        return (self.update_coefficients(rollout) * keep * tf.token_logprobs).sum((1, 2))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_a_counterfactual_equals_the_run_that_trains_only_on_those_tokens(eos_world, loss_type):
    settings = dict(update="identity", trainer=TrainerConfig(loss_type=loss_type, max_grad_norm=0))
    out = run(eos_world, **settings)
    update_tokens = [t for t in out.contributions.tokens if t["role"] == "U"]
    entropies = torch.tensor([t["entropy"] for t in update_tokens], dtype=torch.float64)
    MaskedProbe.threshold = torch.quantile(entropies, 1 - 0.2).item()  # TRL's top_entropy_quantile 0.2
    masked = run(eos_world, probe_class=MaskedProbe, standard_error=False, **settings).finished
    predicted = out.finished.counterfactuals["top_entropy_0.2"]
    assert predicted["fraction"] == pytest.approx(0.2, abs=0.05)
    assert masked.delta_h1 != pytest.approx(out.finished.delta_h1, rel=1e-3)
    assert predicted["delta_h1"] == pytest.approx(masked.delta_h1, rel=1e-6)


def test_the_top_lists_are_the_largest_contributions(eos_world):
    out = run(eos_world)
    result = out.finished
    largest = max(abs(t["contribution"]) for t in out.contributions.tokens if t["contribution"] is not None)
    assert len(result.top_tokens) == 10 and abs(result.top_tokens[0]["contribution"]) == largest
    assert [abs(r["contribution"]) for r in result.top_responses] == sorted(
        (abs(r["contribution"]) for r in out.contributions.responses if r["role"] == "U"), reverse=True
    )[:10]
    assert all(r["tokens"] and len(r["tokens"]) == r["length"] for r in result.top_responses)
