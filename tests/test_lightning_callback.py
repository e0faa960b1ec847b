"""The Lightning EntropyProbeCallback inside a small Lightning policy-gradient run (tests/lightning_policy.py) of a
tiny Llama, AdamW, gradient clipping by norm active on every step (issue 22, items 5 and 6):

- training is untouched: the same parameters and torch RNG state, bit for bit, after STEPS steps with and without it;
- each probed step logs entropy_probe/*, writes a Parquet row (with its probe_seconds), and the run ends with a plot;
- the probe's Δθ is the step Lightning really took, θ′ − θ, after Lightning's own clipping (which runs after the
  hook the probe reads p.grad in), and p.grad unclipped would give another step;
- δH₁ = ⟨X̄, θ′ − θ⟩ with X̄ from the offline probe (build_probe) on the same E batch at θ;
- two DDP processes (CPU, gloo) log the one-process numbers;
- an SGD optimizer, a sharded strategy, manual optimization: one warning each or a refusal naming it, and
  training goes on; the Trainer's clipping (norm and value) is torch's, on copies.
"""

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
from lightning_policy import B_E, CLIP, G, G_E, GENERATION, PROMPTS, STEPS, Policy, probe_callback, train
from tiny_models import tiny_llama

from probe_lightning.build import build_probe
from probe_lightning.checkpoints import trainable_parameters
from probe_lightning.data import PromptBatch
from probe_lightning.estimators import dot
from probe_lightning.integrations import core
from probe_lightning.integrations.core import KEYS
from probe_lightning.integrations.lightning import EntropyProbeCallback, optimizer_gradients
from probe_lightning.integrations.live_optimizer import adam_states
from probe_lightning.preconditioning import adamw_step
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.sequence_processor import SequenceProcessor
from probe_lightning.settings import ProbeSettings

ROOT = Path(__file__).parents[1]
COMPARED = ["delta_h1", "delta_h1_se", "delta_h_true", "delta_h_true_se", "covariance_proxy", "x_norm", "step_norm",
            "entropy_mean"]  # fmt: skip


class StepRecorder(pl.Callback):
    """Each step's θ, p.grad as on_before_optimizer_step sees it (before Lightning clips it) and the AdamW step that
    unclipped gradient would give; θ′ at on_train_batch_end; torch's RNG state when training ends."""

    def __init__(self):
        self.before, self.unclipped_grad_norm, self.unclipped_step, self.after = [], [], [], []
        self.rng = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = trainable_parameters(pl_module.model)
        params = [p for _, p in named]
        self.before.append([p.detach().clone() for p in params])
        self.unclipped_grad_norm.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
        self.unclipped_step.append(adamw_step(adam_states(optimizer, named), params, [-p.grad for p in params]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append([p.detach().clone() for _, p in trainable_parameters(pl_module.model)])

    def on_train_end(self, trainer, pl_module):
        self.rng = torch.get_rng_state()


@dataclass
class Runs:
    plain: Policy  # trained without the probe
    plain_recorder: StepRecorder
    trainer: pl.Trainer  # with the probe
    probed: Policy
    recorder: StepRecorder
    probe: EntropyProbeCallback
    steps: list[list[torch.Tensor]]  # the probe's Δθ of each step (core.adamw_step's result, recorded)


@pytest.fixture(scope="module")
def runs(tokenizer, tmp_path_factory) -> Runs:
    """The run without and with the probe (every step), each with a StepRecorder after it."""
    plain_recorder, recorder = StepRecorder(), StepRecorder()
    _, plain = train(tokenizer, [plain_recorder])
    probe = probe_callback(tokenizer, tmp_path_factory.mktemp("probed"))
    steps = []

    def recording(states, params, grad):
        steps.append(adamw_step(states, params, grad))
        return steps[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, "adamw_step", recording)
        trainer, probed = train(tokenizer, [probe, recorder])
    return Runs(plain, plain_recorder, trainer, probed, recorder, probe, steps)


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over parameter lists, in float64."""
    difference = sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b, strict=True))
    return (difference / sum((y.double() ** 2).sum() for y in b)).sqrt().item()


def real_step(recorder: StepRecorder, step: int) -> list[torch.Tensor]:
    """θ′ − θ of optimizer step `step` + 1, in float64 (exact differences of the float32 weights)."""
    return [after.double() - before.double() for before, after in zip(recorder.before[step], recorder.after[step])]


def test_training_is_bit_identical_with_the_probe(runs):
    assert runs.probe.disabled is None and [row["step"] for row in runs.probe.rows] == list(range(STEPS))
    assert runs.trainer.global_step == STEPS
    for (name, a), (_, b) in zip(runs.plain.named_parameters(), runs.probed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(runs.plain_recorder.rng, runs.recorder.rng)


def test_each_probed_step_is_logged_with_a_row_and_the_run_ends_with_a_plot(runs):
    logged = runs.trainer.logged_metrics  # the last step's
    assert {f"entropy_probe/{key}" for key in KEYS} <= logged.keys()
    assert logged["entropy_probe/delta_h1"].item() == pytest.approx(runs.probe.rows[-1]["delta_h1"], rel=1e-6)
    table = pd.read_parquet(runs.probe.folder / "probes.parquet")
    assert table.step.tolist() == list(range(STEPS)) and set(KEYS) <= set(table.columns)
    assert table[list(KEYS)].notna().all().all() and (table.delta_h1_se > 0).all() and (table.ess > 1).all()
    assert (table.probe_seconds > 0).all()
    assert (runs.probe.folder / "predicted_vs_realized.png").stat().st_size > 0


def test_the_probes_step_is_the_step_lightning_took_after_its_clipping(runs):
    recorder, probe, steps = runs.recorder, runs.probe, runs.steps
    assert len(steps) == STEPS
    assert all(norm > 10 * CLIP for norm in recorder.unclipped_grad_norm)  # clipping is active on every step
    for step in range(STEPS):
        real = real_step(recorder, step)
        # θ′ − θ holds AdamW's own float32 rounding of θ′ (ulp(0.5) = 6e-8 per weight): a few 1e-6 of the step
        assert relative_difference(steps[step], real) < 1e-5, step
        # p.grad as the hook sees it, unclipped, gives another step: Adam's ε, and its moments mixing steps of
        # other scales, see the gradient's scale
        assert relative_difference(recorder.unclipped_step[step], real) > 0.1, step
        real_norm = torch.cat([d.flatten() for d in real]).norm().item()
        assert probe.rows[step]["step_norm"] == pytest.approx(real_norm, rel=1e-5)


def test_delta_h1_is_x_bar_of_the_offline_probe_on_the_same_e_batch_along_the_real_step(runs, tokenizer):
    """At θ of the last probed step: the offline probe, given the callback's E PromptBatch (same prompt rows, same
    response seeds) and any U batch, has X̄: ⟨X̄, θ′ − θ⟩ is the callback's δH₁, as is ⟨X̄, Δθ⟩."""
    recorder, probe, steps = runs.recorder, runs.probe, runs.steps
    step = STEPS - 1
    model = tiny_llama(tokenizer).eval()
    with torch.no_grad():
        for (_, p), theta in zip(trainable_parameters(model), recorder.before[step], strict=True):
            p.copy_(theta)
    processor = SequenceProcessor(model, tokenizer, GENERATION)
    settings = ProbeSettings(model="tiny", G=G, G_E=G_E, generation=GENERATION, standard_error=False)
    offline = build_probe(processor, settings, rewards=RewardFunctions([core.unscored]))
    offline.step(probe.prompt_batch("E", step))
    update = PromptBatch(probe_index=step, role="U", questions=PROMPTS[:2], answers=[None, None], prompt_ids=[0, 1],
                         last_in_probe=True, seed=99)  # fmt: skip
    offline.step(update)
    online = probe.rows[step]
    assert online["e_prompt_rows"] == probe.prompt_batch("E", step).prompt_ids and online["B_E"] == B_E
    assert online["delta_h1"] != 0
    assert dot(offline.vectors.x_bar, steps[step]) == pytest.approx(online["delta_h1"], rel=1e-6)
    assert dot(offline.vectors.x_bar, real_step(recorder, step)) == pytest.approx(online["delta_h1"], rel=1e-6)


def test_two_ddp_processes_log_the_one_process_numbers(runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "tests/lightning_policy.py", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "EntropyProbeCallback" not in done.stderr  # no warning: nothing refused, nothing failed
    two = pd.read_parquet(tmp_path / "probes.parquet")  # rank 0's
    one = pd.DataFrame(runs.probe.rows)
    assert two.step.tolist() == one.step.tolist() == list(range(STEPS))
    assert (two.world_size == 2).all() and (one.world_size == 1).all() and (two.B_E == one.B_E).all()
    assert two.e_prompt_rows.map(list).tolist() == one.e_prompt_rows.tolist()
    for key in COMPARED:
        assert two[key].tolist() == pytest.approx(one[key].tolist(), rel=1e-6), key


def test_an_sgd_optimizer_is_refused_in_one_warning_and_training_completes(tokenizer, tmp_path):
    probe = probe_callback(tokenizer, tmp_path / "probe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = train(tokenizer, [probe], optimizer="sgd")
    ours = [str(w.message) for w in caught if "EntropyProbeCallback" in str(w.message)]
    assert ours == ["EntropyProbeCallback: optimizer SGD is not Adam/AdamW: the probe's step is the exact "
                    "Adam/AdamW step; training continues without the probe"]  # fmt: skip
    assert trainer.global_step == STEPS and probe.rows == []
    assert not (tmp_path / "probe").exists()


def test_a_sharded_strategy_and_manual_optimization_are_refused_naming_them(tokenizer):
    probe = probe_callback(tokenizer)
    module = SimpleNamespace(automatic_optimization=True, model=torch.nn.Linear(2, 2))
    optimizer = torch.optim.AdamW(module.model.parameters())
    sharded = SimpleNamespace(strategy=FSDPStrategy(), optimizers=[optimizer])
    assert probe._refusal(sharded, module) == (
        "trainer.strategy FSDPStrategy: the probe needs every parameter whole on each process (supported: "
        "SingleDeviceStrategy, DDPStrategy)"
    )
    manual = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), optimizers=[optimizer])
    module.automatic_optimization = False
    assert probe._refusal(manual, module).startswith("manual optimization")


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_the_gradients_are_clipped_as_the_trainer_clips_them_on_copies(algorithm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params)
    raw = [p.grad.clone() for p in params]
    trainer = SimpleNamespace(gradient_clip_val=0.3, gradient_clip_algorithm=algorithm)
    ours = optimizer_gradients(trainer, optimizer)(params[:1])  # the norm is still over all the optimizer's
    assert all(torch.equal(p.grad, g) for p, g in zip(params, raw))  # p.grad untouched
    clip = torch.nn.utils.clip_grad_norm_ if algorithm == "norm" else torch.nn.utils.clip_grad_value_
    clip(params, 0.3)  # what Lightning's precision plugin calls
    assert torch.allclose(ours[0], params[0].grad, rtol=1e-6, atol=0) and not torch.equal(ours[0], raw[0])
