"""The probe's ∇J̄ is the trainer's: TRL's loss types, reward scalings, clipping and every option that changes
the step (entropy bonus and mask, truncated completions masked, the KL term, sequence-level importance sampling,
reward weights), over rollout batches and microbatches, in a world with EOS (lengths vary, so every normaliser
matters).

tests/test_trainer_loss.py proves trainer_coefficients against TRL's own GRPOTrainer loss; here the probe, which
splits the U batch into rollout batches and microbatches and applies the batch-level factors at the end (or holds
the U batch whole when an option needs it), is held against trainer_coefficients over the whole U batch as one
tensor; and its contributions still add up to δH₁.
"""

import json

import pytest
import torch
import torch.nn.functional as F
import trl
from cli_helpers import cli_args, results_file
from enumerable_world import PROMPTS
from eos_world import save_eos_world
from peft import LoraConfig, get_peft_model
from probe_helpers import TRAINABLE, head_adam_state, make_probe, prompt_batches
from user_rewards import even_token_sum, token_sum

import train

from probe_lightning import estimators
from probe_lightning.build import build_probe
from probe_lightning.config import TrainerConfig
from probe_lightning.models import load_model_and_tokenizer
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor
from probe_lightning.settings import ProbeSettings
from probe_lightning.trainer_loss import advantages, entropy_threshold, trainer_coefficients, truncated_completions

pytestmark = pytest.mark.usefixtures("one_thread")
G = 3


@pytest.fixture(scope="module")
def eos_world(tmp_path_factory) -> str:
    return save_eos_world(tmp_path_factory.mktemp("eos_world"))


@pytest.fixture(scope="module")
def reference_world(tmp_path_factory) -> str:
    """The KL term's reference: the same world from another seed."""
    return save_eos_world(tmp_path_factory.mktemp("reference_world"), seed=1)


def run_probe(world, standard_error=False, **settings):
    """One probe with E = PROMPTS and U = PROMPTS * 2 in rollout batches of 3 prompts, one prompt per forward."""
    trainer = TrainerConfig(**settings.pop("trainer", {}))
    probe = make_probe(
        world, tf_batch_size=G, G=G, G_E=2, update=settings.pop("update", "identity"), standard_error=standard_error,
        entropy_target="budget", trainer=trainer, **settings,
    )  # fmt: skip
    return probe, *drive(probe)


def drive(probe, seed=11):
    outputs = [probe.step(batch) for batch in prompt_batches(0, PROMPTS, PROMPTS * 2, rollout_batch_size=3, seed=seed)]
    return [out.rollout for out in outputs if out.rollout.role == "U"], outputs[-1]


def whole_batch_grad_j(probe, rollouts, reference=None):
    """∇(Σ c log q + Σ c_H H) with trainer_coefficients of the whole U batch as one tensor (TRL's view of the
    step): its advantages, TRL's loss mask and entropy mask, the reference's log-probs."""
    trainer, processor = probe.trainer, probe.processor
    width = max(r.batch.response_mask.shape[-1] for r in rollouts)

    def padded(tensors):
        return torch.cat([F.pad(t, (0, width - t.shape[-1])) for t in tensors])

    masks = padded([r.batch.response_mask.float() for r in rollouts])
    if trainer.mask_truncated_completions:
        last = padded([r.batch.sequences[..., r.batch.prompt_len :] for r in rollouts]).gather(
            -1, (masks.sum(-1, keepdim=True).long() - 1).clamp(min=0)
        )
        masks = masks * ~truncated_completions(last, processor.config.eos_token_ids, processor.config.pad_token_id)
    rewards = torch.cat([r.rewards for r in rollouts])
    scored = [processor.teacher_force_logprobs(r.batch, with_grad=True) for r in rollouts]
    logprobs, entropies = padded([tf.token_logprobs for tf in scored]), padded([tf.token_entropies for tf in scored])
    keep = None
    if trainer.top_entropy_quantile < 1:  # over the entropies generation computed, as the probe's selection
        generated = padded([r.batch.token_entropies for r in rollouts])
        keep = generated >= entropy_threshold(generated[masks.bool()], trainer.top_entropy_quantile)
    ref_logprobs = None
    if trainer.beta:
        ref_logprobs = padded([reference.teacher_force_logprobs(r.batch).token_logprobs for r in rollouts])
    coefficients, bonus = trainer_coefficients(
        trainer, advantages(rewards, trainer.scale_rewards), masks,
        max_lengths=torch.cat([r.max_lengths for r in rollouts]), keep=keep, token_logprobs=logprobs.detach(),
        ref_logprobs=ref_logprobs,
    )  # fmt: skip
    objective = (coefficients * logprobs).sum() + (0 if bonus is None else (bonus * entropies).sum())
    return list(torch.autograd.grad(objective, [p for _, p in probe.named_params]))


def reference_processor(world, probe):
    model, tokenizer = load_model_and_tokenizer(world)
    return SequenceProcessor(model, tokenizer, probe.processor.config)


def relative_error(a, b) -> float:
    a, b = torch.cat([x.flatten().double() for x in a]), torch.cat([x.flatten().double() for x in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scale_rewards", ["none", "group", "batch"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "seed"])
def test_grad_j_is_the_whole_batch_trainer_gradient(eos_world, loss_type, scale_rewards):
    trainer = dict(loss_type=loss_type, scale_rewards=scale_rewards, max_grad_norm=0)
    probe, rollouts, out = run_probe(eos_world, trainer=trainer)
    assert sum(r.rewards.std(dim=1).gt(0).sum().item() for r in rollouts) > 0, "no mixed group: ∇J̄ = 0"
    expected = whole_batch_grad_j(probe, rollouts)
    assert estimators.norm(expected) > 0
    assert relative_error(probe.vectors.grad_j, expected) < 1e-6
    assert out.finished.clip_factor == 1.0


# Options whose coefficients need the whole U batch (the probe holds it), and the immediate ones.
OPTIONS = {
    "grpo_sequence_level": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "cispo_epsilon_high": dict(loss_type="cispo", epsilon_high=0.5),
    "entropy_bonus": dict(entropy_coef=0.05),
    "entropy_bonus_grpo": dict(loss_type="grpo", entropy_coef=0.05),
    "top_entropy_quantile": dict(top_entropy_quantile=0.2),
    "top_entropy_quantile_grpo_sequence_level": dict(
        loss_type="grpo", importance_sampling_level="sequence", top_entropy_quantile=0.2
    ),
    "mask_truncated_completions": dict(mask_truncated_completions=True),
    "mask_truncated_completions_grpo": dict(loss_type="grpo", mask_truncated_completions=True),
    "kl": dict(beta=0.1),
    "kl_without_bias_correction": dict(beta=0.1, use_bias_correction_kl=False),
    "kl_luspo_sequence_level": dict(loss_type="luspo", beta=0.1, importance_sampling_level="sequence"),
    "everything_batch_scaled": dict(
        loss_type="grpo", scale_rewards="batch", importance_sampling_level="sequence", entropy_coef=0.05,
        top_entropy_quantile=0.5, mask_truncated_completions=True, beta=0.1,
    ),
}


@pytest.mark.parametrize("max_grad_norm", [0, 1e-3], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("option", OPTIONS)
def test_grad_j_with_each_option_is_the_whole_batch_trainer_gradient(eos_world, reference_world, option, max_grad_norm):
    trainer = {**OPTIONS[option], "max_grad_norm": max_grad_norm}
    reference = reference_world if trainer.get("beta") else None
    probe, rollouts, out = run_probe(eos_world, trainer=trainer, reference=reference)
    assert probe.update_batch.holds == (option not in ("grpo_sequence_level", "cispo_epsilon_high"))
    expected = whole_batch_grad_j(probe, rollouts, reference_processor(reference_world, probe) if reference else None)
    clip = out.finished.clip_factor
    assert (clip < 1) == bool(max_grad_norm)
    assert relative_error(probe.vectors.grad_j, [clip * g for g in expected]) < 1e-6


def test_the_entropy_mask_keeps_the_top_fraction_of_the_u_batch(eos_world):
    probe, rollouts, _ = run_probe(eos_world, trainer=dict(top_entropy_quantile=0.2))
    kept = sum(int(mask.sum()) for mask in probe.update_batch.entropy_masks.values())
    tokens = sum(int(r.batch.response_mask.sum()) for r in rollouts)
    assert kept == probe.update_batch.counts.bonus_tokens and kept == pytest.approx(0.2 * tokens, abs=2)


def test_truncated_completions_leave_the_loss_and_its_token_count(eos_world):
    """TRL's rule: a completion whose last token is neither EOS (1) nor pad (0, which this world can sample)."""
    probe, rollouts, _ = run_probe(eos_world, trainer=dict(mask_truncated_completions=True))
    responses = [(r.batch.sequences[b, g, r.batch.prompt_len :], n) for r in rollouts
                 for b, lengths in enumerate(r.batch.gen_lens) for g, n in enumerate(lengths)]  # fmt: skip
    kept = [n for tokens, n in responses if tokens[n - 1].item() in (0, 1)]
    assert 0 < len(kept) < len(responses)
    assert all(n == 3 for tokens, n in responses if tokens[n - 1].item() not in (0, 1))  # they filled the budget
    assert probe.update_batch.counts.tokens == sum(kept)


@pytest.mark.parametrize("update", ["identity", "adam_precondition"])
def test_contributions_add_up_to_delta_h1_with_the_entropy_bonus_mask_and_kl_term(
    eos_world, reference_world, tmp_path, update
):
    state = None
    if update == "adam_precondition":  # a real AdamW state of the output layer
        state = head_adam_state(tmp_path / "optimizer.pt")
    trainer = dict(
        loss_type="grpo", entropy_coef=0.05, top_entropy_quantile=0.5, mask_truncated_completions=True, beta=0.1,
        importance_sampling_level="sequence", max_grad_norm=0.5,
    )  # fmt: skip
    _, _, out = run_probe(
        eos_world, standard_error=True, trainer=trainer, reference=reference_world, update=update,
        optimizer_state=state and str(state), dtype=torch.float64,
    )  # fmt: skip
    result, tables = out.finished, out.contributions
    assert result.contributions_add_up_to == "delta_h1" and result.delta_h1 != 0
    tokens = [t["contribution"] for t in tables.tokens if t["role"] == "U"]
    prompts = list(result.update_prompt_contributions.values())
    for parts in (tokens, prompts, list(result.entropy_prompt_contributions.values())):
        assert abs(sum(parts) - result.delta_h1) <= 1e-6 * abs(result.delta_h1)
    assert result.counterfactuals["all"]["delta_h1"] == pytest.approx(result.delta_h1, rel=1e-6)


def test_the_eta_sweep_takes_the_step_with_the_options(eos_world, reference_world):
    trainer = dict(entropy_coef=0.05, top_entropy_quantile=0.5, beta=0.1, max_grad_norm=0)
    probe = make_probe(
        eos_world, tf_batch_size=G, G=G, G_E=2, update="identity", standard_error=False, entropy_target="budget",
        trainer=TrainerConfig(**trainer), reference=reference_world, eta_sweep=[0.0, 0.5],
    )  # fmt: skip
    batches = prompt_batches(0, PROMPTS, PROMPTS * 2, rollout_batch_size=3, evaluation_prompts=PROMPTS, seed=11)
    result = [probe.step(batch) for batch in batches][-1].finished
    zero, half = result.eta_sweep
    assert zero["delta_h_true"] == 0.0 and half["delta_h1"] == pytest.approx(0.5 * result.bars_dot, rel=1e-6)
    assert half["delta_h_true"] != 0.0 and half["ess"] > 1


def test_clipping_scales_grad_j_to_max_grad_norm(eos_world):
    trainer = dict(loss_type="dapo", scale_rewards="group", max_grad_norm=1e-3)
    probe, rollouts, out = run_probe(eos_world, trainer=trainer)
    unclipped = estimators.norm(whole_batch_grad_j(probe, rollouts))
    result = out.finished
    assert result.clip_factor == pytest.approx(1e-3 / (unclipped + 1e-6), rel=1e-6)
    assert estimators.norm(probe.vectors.grad_j) == pytest.approx(1e-3 * unclipped / (unclipped + 1e-6), rel=1e-6)
    assert result.delta_h1 == pytest.approx(estimators.dot(probe.vectors.x_bar, probe.vectors.grad_j))


# ---- settings read from a checkpoint folder: the adaptive controller's state, the reward weights ----


def checkpoint_folder(world, folder, controller=None, **args):
    """The world model as checkpoint-N/ of a TRL run with these GRPOConfig settings (no optimizer state)."""
    model, tokenizer = load_model_and_tokenizer(world)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = trl.GRPOConfig(output_dir=str(folder), report_to="none", use_cpu=True, max_completion_length=3,
                            num_generations=G, per_device_train_batch_size=G, **args)  # fmt: skip
    torch.save(config, folder / "training_args.bin")
    if controller is not None:
        (folder / "entropy_ctrl_state.json").write_text(json.dumps(controller))
    return str(folder)


def test_the_adaptive_bonus_is_the_saved_controllers(eos_world, tmp_path):
    folder = checkpoint_folder(eos_world, tmp_path / "checkpoint-4", controller={"entropy_coef": 0.07,
                               "last_world_entropy": 0.1}, use_adaptive_entropy=True, entropy_coef=0.01)  # fmt: skip
    probe, rollouts, _ = run_probe(eos_world, checkpoint=folder, trainer=dict(max_grad_norm=0))
    assert probe.trainer.entropy_bonus == 0.07  # the coefficient saved, applied: 0.1 <= entropy_target 0.2
    trainer = probe.results.to_dict()["trainer"]
    assert trainer["entropy_coef"] == {"value": 0.07, "source": "checkpoint (entropy_ctrl_state.json)"}
    assert relative_error(probe.vectors.grad_j, whole_batch_grad_j(probe, rollouts)) < 1e-6


def test_reward_weights_come_from_the_checkpoint_unless_given(eos_world, tmp_path):
    folder = checkpoint_folder(eos_world, tmp_path / "checkpoint-2", reward_weights=[1.0, 0.5])

    def build(weights):
        settings = ProbeSettings(
            model=eos_world, checkpoint=folder, update="identity", learning_rate=1.0,
            generation=GenerationConfig(tf_batch_size=G), trainer=TrainerConfig(max_grad_norm=0),
            entropy_target="budget", standard_error=False,
        )  # fmt: skip
        model, tokenizer = load_model_and_tokenizer(folder)
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(TRAINABLE))
        rewards = RewardFunctions([token_sum, even_token_sum], weights=weights)
        return build_probe(SequenceProcessor(model, tokenizer, settings.generation), settings, rewards=rewards)

    probe = build(None)
    rollouts, _ = drive(probe)
    for rollout in rollouts:  # even_token_sum is None on odd sums: NaN, left out of the weighted sum
        ids = rollout.batch.sequences[..., rollout.batch.prompt_len :] * rollout.batch.response_mask
        sums = ids.sum(-1).double()
        expected = sums + 0.5 * torch.where(sums % 2 == 0, sums, 0.0)
        torch.testing.assert_close(rollout.rewards.double(), expected)
    assert probe.results.to_dict()["trainer"]["reward_weights"] == {"value": [1.0, 0.5], "source": "checkpoint"}
    assert relative_error(probe.vectors.grad_j, whole_batch_grad_j(probe, rollouts)) < 1e-6
    given = build([1.0, 2.0]).results.to_dict()["trainer"]["reward_weights"]
    assert given == {"value": [1.0, 2.0], "source": "config (checkpoint had [1.0, 0.5])"}


def test_a_lora_checkpoints_kl_reference_is_its_base_with_the_adapter_disabled(eos_world, tmp_path):
    base, tokenizer = load_model_and_tokenizer(eos_world)
    adapter = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path / "checkpoint-1"
    get_peft_model(base, adapter).save_pretrained(folder)  # B ≠ 0: the adapter changes the policy
    tokenizer.save_pretrained(folder)
    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=0.1, max_completion_length=3,
                          num_generations=G, per_device_train_batch_size=G)  # fmt: skip
    torch.save(args, folder / "training_args.bin")
    probe, rollouts, _ = run_probe(eos_world, checkpoint=str(folder), trainable=None, trainer=dict(max_grad_norm=0))
    assert "adapter disabled" in probe.settings.reference_source
    expected = whole_batch_grad_j(probe, rollouts, reference_processor(eos_world, probe))  # the base model itself
    assert relative_error(probe.vectors.grad_j, expected) < 1e-6
    policy = probe.processor.teacher_force_logprobs(rollouts[0].batch).token_logprobs
    reference = torch.stack([probe.update_batch.reference_logprobs[i] for i in rollouts[0].prompt_ids])
    assert (policy - reference).abs().max() > 1e-3  # a KL term that is not zero


def test_the_command_line_takes_the_options_and_says_later_steps_are_not_predicted(
    world, prompts_file, tmp_path, caplog
):
    options = ["--model.trainer.loss_type", "cispo", "--model.trainer.entropy_coef", "0.01",
               "--model.trainer.top_entropy_quantile", "0.5", "--model.trainer.num_iterations", "2"]  # fmt: skip
    with caplog.at_level("INFO"):
        train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", *options))
    (line,) = [r.message for r in caplog.records if r.message.startswith("δH₁ = ")]
    assert "loss: cispo" in line and "δH₁ predicts the first (importance ratio 1)" in line
    results = json.loads(results_file(tmp_path).read_text())
    trainer = results["trainer"]
    assert trainer["entropy_coef"] == {"value": 0.01, "source": "config"}
    assert trainer["top_entropy_quantile"] == {"value": 0.5, "source": "config"}
    assert trainer["beta"] == {"value": 0.0, "source": "default"}
    assert any("clamp min(1, epsilon_high=0.2) scales the policy gradient by 0.2" in note for note in results["notes"])
    (probe,) = results["probes"]
    assert sum(probe["update_prompt_contributions"].values()) == pytest.approx(probe["delta_h1"], rel=1e-6)
