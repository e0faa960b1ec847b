"""The entropy bonus that holds the entropy steady (counterfactuals' entropy_coef_for_zero): the step the probe
predicts at its c* leaves the entropy unchanged to first order, whether c* is a linear solve or a root search; in the
enumerable world c* matches the exact one and its SE the spread over probes; where no bonus holds the entropy, the
entry says why."""

import copy
import functools
import itertools
import logging

import pytest
import torch
from enumerable_world import PROMPTS, RESPONSE_LEN, VOCAB, exact_prompt, mean_grads, save_world
from probe_helpers import make_probe, prompt_batches, run_probes, z_score

from probe_lightning.config import TrainerConfig
from probe_lightning.entropy_coef import CoefficientStep, EntropyCoefficient
from probe_lightning.estimators import dot
from probe_lightning.preconditioning import adam_states_from_state_dict
from probe_lightning.results import ENTROPY_COEF_FOR_ZERO
from probe_lightning.update import UpdateGeometry

pytestmark = pytest.mark.usefixtures("one_thread")
log = logging.getLogger(__name__)  # the measured numbers: pytest --log-cli-level=INFO


@pytest.fixture(scope="module")
def lowering_world(tmp_path_factory) -> str:
    """The enumerable world from seed 9, where the step without a bonus lowers the entropy (exact δH₁(0) = −0.025,
    exact c* = 0.067): a positive entropy_coef holds it. In the default world (seed 0) the step raises it."""
    return save_world(tmp_path_factory.mktemp("lowering_world"), seed=9)


def adam_state(folder, gradient_scale: float) -> str:
    """optimizer.pt of three real AdamW steps of the world's output layer on random gradients of this scale."""
    head = torch.nn.Parameter(torch.zeros(len(VOCAB), 16))
    optimizer = torch.optim.AdamW([head], lr=0.01)
    for step in range(3):
        head.grad = gradient_scale * torch.randn(len(VOCAB), 16, generator=torch.Generator().manual_seed(step))
        optimizer.step()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    return str(folder / "optimizer.pt")


def probe_once(world, entropy_coef=None, max_grad_norm=0.0, update="identity", optimizer_state=None):
    """One probe (E and U: PROMPTS four times over, fixed samples), float64; its finished result."""
    trainer = TrainerConfig(loss_type="grpo", max_grad_norm=max_grad_norm, entropy_coef=entropy_coef)
    probe = make_probe(
        world, G=4, G_E=4, entropy_target="budget", estimator="rb", dtype=torch.float64, trainer=trainer,
        update=update, optimizer_state=optimizer_state, learning_rate=0.01,
    )  # fmt: skip
    return [probe.step(batch) for batch in prompt_batches(0, PROMPTS * 4, PROMPTS * 4, 8, seed=3)][-1].finished


@pytest.mark.parametrize(
    ("update", "max_grad_norm", "method"),
    [("identity", 0.0, "linear"), ("identity", 0.05, "linear"), ("adamw_step", 0.05, "root search")],
    ids=["identity", "identity_clipped", "adamw_step_clipped"],
)
def test_the_step_at_c_star_leaves_the_entropy_unchanged(lowering_world, tmp_path, update, max_grad_norm, method):
    """The same samples probed again with the trainer's entropy_coef = c*: its δH₁ (the exact first-order change
    along that step) is 0, and it predicts the first probe's δH₁ back at coefficient 0."""
    state = adam_state(tmp_path, 0.005) if update == "adamw_step" else None
    first = probe_once(lowering_world, max_grad_norm=max_grad_norm, update=update, optimizer_state=state)
    entry = first.counterfactuals[ENTROPY_COEF_FOR_ZERO]
    assert entry["method"] == method and entry["exists"] and entry["value"] > 0 and entry["note"] is None
    assert entry["checkpoint_coef"] == 0 and entry["delta_h1_at_checkpoint_coef"] == first.delta_h1 < 0
    assert entry["delta_h1_at_zero_coef"] == pytest.approx(first.delta_h1, rel=1e-12)
    assert entry["se"] > 0 and entry["delta_h1_slope"] > 0
    again = probe_once(lowering_world, entropy_coef=entry["value"], max_grad_norm=max_grad_norm, update=update,
                       optimizer_state=state)  # fmt: skip
    scale = abs(entry["delta_h1_at_zero_coef"]) + abs(entry["value"] * entry["delta_h1_slope"])
    log.info("%s: c* = %.6g, δH₁(0) = %.4g, δH₁(c*) = %.3g", update, entry["value"], first.delta_h1, again.delta_h1)
    assert abs(again.delta_h1) <= 1e-6 * scale
    assert (again.clip_factor < 1) == (first.clip_factor < 1) == (max_grad_norm > 0)
    rerun = again.counterfactuals[ENTROPY_COEF_FOR_ZERO]
    assert rerun["checkpoint_coef"] == entry["value"]
    assert rerun["delta_h1_at_zero_coef"] == pytest.approx(first.delta_h1, rel=1e-6)
    assert rerun["value"] == pytest.approx(entry["value"], rel=1e-6)


def exact_bonus_gradient(model, tokenizer, prompt) -> list[torch.Tensor]:
    """E[g_b | p] = Σ_y q(y) Σ_t ∇H_t(y_<t) / T: the bonus's expected gradient per unit coefficient (pathwise: q is
    not differentiated), by enumerating every response in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    prompt_ids = tokenizer(prompt.question, add_special_tokens=False).input_ids
    responses = torch.tensor(list(itertools.product(range(len(VOCAB)), repeat=RESPONSE_LEN)))
    ids = torch.cat([torch.tensor(prompt_ids).expand(len(responses), -1), responses], dim=1)
    log_q = model(input_ids=ids).logits[:, len(prompt_ids) - 1 : -1].double().log_softmax(-1)
    q = log_q.gather(-1, responses[..., None]).squeeze(-1).sum(-1).exp().detach()
    entropies = -(log_q.exp() * log_q).sum(-1)  # [responses, T]
    return [g.double() for g in torch.autograd.grad((q * entropies.sum(-1)).sum() / RESPONSE_LEN, params)]


@functools.cache
def exact_c_star(world: str, G: int) -> float:
    """c*_exact = −⟨∇H, E ḡ_p⟩ / ⟨∇H, E g_b⟩ (identity geometry, no clipping, dapo without reward scaling): with
    fixed lengths E[ḡ_p] = (1 − 1/G) ∇E[r]/T and the bonus's normaliser is fixed."""
    probe = make_probe(world)
    model, tokenizer = probe.processor.model, probe.processor.tokenizer
    exact = [exact_prompt(model, tokenizer, p) for p in PROMPTS]
    grad_h = mean_grads([p.entropy_grad for p in exact])
    policy = [(1 - 1 / G) * g for g in mean_grads([p.reward_grad for p in exact])]
    bonus = mean_grads([exact_bonus_gradient(model, tokenizer, p) for p in PROMPTS])
    return -dot(grad_h, policy) / dot(grad_h, bonus)


def test_c_star_matches_the_exact_one_and_its_se_the_spread_over_probes(lowering_world):
    """200 probes of 48 E and 48 U prompts (G = 4). The ratio's bias, c*·(Var B/B² − Cov(A, B)/(A B)) with A = δH₁(0)
    and B = ∂δH₁/∂c, is below 1% of c* when B's relative spread is below 5% (asserted; it is about 2% here), far below
    the 3 SE of the mean the test allows (about 8% of c*); so a wrong factor (1 − 1/G), a missing 1/T in g_b or a sign
    fails. The SE must match the spread within a factor 0.6–1.6."""
    exact = exact_c_star(lowering_world, G=4)
    trainer = TrainerConfig(loss_type="dapo", scale_rewards="none", max_grad_norm=0)
    probe = make_probe(lowering_world, G=4, G_E=4, entropy_target="budget", estimator="rb", trainer=trainer,
                       breakdown_se=False)  # c* only
    results, _, _ = run_probes(probe, 200, PROMPTS * 12, PROMPTS * 12, seed=7)
    entries = [r.counterfactuals[ENTROPY_COEF_FOR_ZERO] for r in results]
    values = torch.tensor([e["value"] for e in entries], dtype=torch.float64)
    errors = torch.tensor([e["se"] for e in entries], dtype=torch.float64)
    slopes = torch.tensor([e["delta_h1_slope"] for e in entries], dtype=torch.float64)
    z, se = z_score(values, exact)
    typical_se = errors.pow(2).mean().sqrt().item()
    calibration = values.std().item() / typical_se
    log.info("exact c* %.5g, mean %.5g ± %.2g over %d probes (z=%.2f); spread %.3g, SE %.3g (ratio %.2f)",
             exact, values.mean(), se, len(values), z, values.std(), typical_se, calibration)  # fmt: skip
    assert all(e["exists"] and e["method"] == "linear" for e in entries)
    assert slopes.std() < 0.05 * slopes.mean(), "the ratio's bias is not negligible: larger batches"
    assert se < 0.1 * abs(exact), f"the test has no power: SE {se:.3g} vs exact {exact:.3g}"
    assert z < 3, f"mean c* {values.mean():.5g} vs exact {exact:.5g}: {z:.2f} SE apart"
    assert 0.6 < calibration < 1.6


def test_a_step_that_raises_the_entropy_has_no_bonus_that_holds_it(world):
    """In the default world the step already raises the entropy and the bonus raises it further: only a negative
    coefficient would hold it, outside TRL's entropy_coef >= 0."""
    entry = probe_once(world).counterfactuals[ENTROPY_COEF_FOR_ZERO]
    assert not entry["exists"] and entry["value"] < 0 and entry["delta_h1_at_zero_coef"] > 0
    assert entry["delta_h1_slope"] > 0 and "only a negative entropy_coef" in entry["note"]


def test_when_the_momentum_drift_outweighs_any_bonus_the_root_search_says_so(lowering_world, tmp_path):
    """AdamW's step on a large momentum, its fresh gradient clipped small: the bonus's share saturates before it
    outweighs the drift, so δH₁(c) keeps its sign for every c >= 0."""
    state = adam_state(tmp_path, 0.05)
    result = probe_once(lowering_world, max_grad_norm=1e-3, update="adamw_step", optimizer_state=state)
    entry = result.counterfactuals[ENTROPY_COEF_FOR_ZERO]
    assert entry["method"] == "root search" and not entry["exists"] and entry["value"] is None
    assert entry["se"] is None and "saturates" in entry["note"]
    assert entry["delta_h1_at_zero_coef"] == pytest.approx(result.delta_h1, rel=1e-12) and result.delta_h1 < 0


def test_the_root_search_zero_is_a_zero_of_torchs_own_clipped_adamw_step():
    """Synthetic vectors, no model: at the c* the root search finds, clip_grad_norm_ then torch.optim.AdamW.step() on
    ∇J̄(c*) = ḡ + c* g_b move θ by Δθ with ⟨X̄, Δθ⟩ = 0; and ∂δH₁/∂c is the real step's finite difference."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,)]
    theta = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    x_bar = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    bonus = [x + 0.5 * torch.randn(s, generator=generator, dtype=torch.float64) for x, s in zip(x_bar, shapes)]
    grad = [-x + torch.randn(s, generator=generator, dtype=torch.float64) for x, s in zip(x_bar, shapes)]
    weights = [torch.nn.Parameter(t.clone()) for t in theta]
    optimizer = torch.optim.AdamW(weights, lr=0.01, weight_decay=0.1)
    for step in range(2):  # a state: momentum and second moments of earlier, smaller gradients
        for w in weights:
            w.grad = 0.1 * torch.randn(w.shape, generator=generator, dtype=torch.float64)
        optimizer.step()
    state_dict = optimizer.state_dict()
    named = [(f"p{i}", w) for i, w in enumerate(weights)]
    states = adam_states_from_state_dict(copy.deepcopy(state_dict), named)
    geometry = UpdateGeometry.build("adamw_step", 0.01, states)
    max_grad_norm = 1.0
    norm = dot(grad, grad) ** 0.5
    clip = min(1.0, max_grad_norm / (norm + 1e-6))
    assert clip < 1
    step = CoefficientStep([clip * g for g in grad], bonus, norm, clip, 0.0, max_grad_norm, 1.0)
    params = [w.detach() for w in weights]
    delta_h1 = dot(x_bar, geometry.step_direction(step.grad_j, params))
    coefficient = EntropyCoefficient(geometry, step, x_bar, params, delta_h1)
    root, at_zero, note = coefficient.solve()
    assert note is None and root > 0 and at_zero == pytest.approx(delta_h1, rel=1e-12) and delta_h1 < 0

    def torch_delta_h1(c: float) -> float:
        """⟨X̄, Δθ⟩ of the trainer's own step: clip_grad_norm_, then AdamW.step(), from the saved state."""
        moved = [torch.nn.Parameter(w.detach().clone()) for w in weights]
        again = torch.optim.AdamW(moved, lr=0.01, weight_decay=0.1)
        again.load_state_dict(copy.deepcopy(state_dict))  # step() would change the saved moments in place
        for w, g, b in zip(moved, grad, bonus):
            w.grad = -(g + c * b)
        torch.nn.utils.clip_grad_norm_(moved, max_grad_norm)
        again.step()
        return sum(torch.dot(x.flatten(), (w.detach() - p).flatten()).item() for x, w, p in zip(x_bar, moved, params))

    at_root = torch_delta_h1(root)
    h = 1e-5 * root
    finite_difference = (torch_delta_h1(root + h) - torch_delta_h1(root - h)) / (2 * h)
    log.info("c* = %.8g: δH₁(0) = %.4g, torch's δH₁(c*) = %.3g; slope %.8g, finite difference %.8g",
             root, at_zero, at_root, coefficient.slope(root), finite_difference)  # fmt: skip
    assert abs(at_root) <= 1e-6 * abs(at_zero)  # adamw_step rounds Δθ to float32 (about 3e-9 of δH₁(0) here)
    assert coefficient.slope(root) == pytest.approx(finite_difference, rel=1e-6)


def test_without_entropy_coef_for_zero_the_probe_keeps_no_bonus_sum_and_the_same_delta_h1(world):
    """model.entropy_coef_for_zero false skips the bonus's backward and sum: the same δH₁ and token
    selections, no entropy_coef entry."""
    trainer = TrainerConfig(loss_type="grpo", max_grad_norm=0.0)
    results = []
    for wanted in (True, False):
        probe = make_probe(
            world, G=4, G_E=4, entropy_target="budget", estimator="rb", dtype=torch.float64, trainer=trainer,
            learning_rate=0.01, entropy_coef_for_zero=wanted,
        )  # fmt: skip
        assert (probe.sums.sum_b is None) == (not wanted)
        results.append([probe.step(b) for b in prompt_batches(0, PROMPTS * 4, PROMPTS * 4, 8, seed=3)][-1].finished)
    with_c, without_c = results
    assert without_c.delta_h1 == with_c.delta_h1
    assert ENTROPY_COEF_FOR_ZERO in with_c.counterfactuals and ENTROPY_COEF_FOR_ZERO not in without_c.counterfactuals
    assert without_c.counterfactuals == {k: v for k, v in with_c.counterfactuals.items() if k != ENTROPY_COEF_FOR_ZERO}
