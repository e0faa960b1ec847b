"""trainer_loss against TRL's own GRPOTrainer code: its advantages, its loss's gradient, torch's clipping.

TRL's code is called on a GRPOTrainer built around a tiny random Llama: `_generate_and_score_completions`
samples completions and turns the rewards of a fixed reward function into advantages, and `_compute_loss`
gives the loss whose gradient the trainer follows. The trainer's loss_type / scale_rewards attributes are
switched between cases instead of building twelve trainers.

TRL computes log-probs with a fused LM-head kernel that accumulates in float32 whatever the model's dtype,
which limits any gradient comparison to about 1e-5 relative. To check the loss code to 1e-6, the model is
float64 and the trainer's log-prob method is replaced by a plain float64 log_softmax (which agrees with
TRL's kernel to float32 precision, tested below); everything after the log-probs is TRL's own code.
"""

import dataclasses
from functools import partial

import datasets
import pytest
import torch
import trl
from tiny_models import tiny_llama

from probe_lightning import estimators, trainer_loss
from probe_lightning.config import ProbeConfigError
from probe_lightning.trainer_loss import TrainerSettings

PROMPTS = ["The cat sat", "Two plus two is"]
G = 3
MAX_COMPLETION_LENGTH = 10
REWARDS = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.9, 0.3]])  # [B, G], what the reward function returns
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
SCALES = ["none", "group", "batch"]


@pytest.fixture(scope="module")
def grpo_trainer(tokenizer, tmp_path_factory):
    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=len(PROMPTS) * G,  # one generation batch = one microbatch = one step
        num_generations=G,
        max_completion_length=MAX_COMPLETION_LENGTH,
    )
    trainer = trl.GRPOTrainer(
        model=tiny_llama(tokenizer, eos_scale=5.0).double(),  # EOS likely enough that completion lengths differ
        reward_funcs=lambda prompts, completions, **kwargs: REWARDS.flatten().tolist(),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's train loop, read by _compute_loss
    trainer.trl_logprobs_and_entropies = trainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = float64_logprobs_and_entropies
    return trainer


@pytest.fixture(scope="module")
def scored(grpo_trainer):
    """TRL's generation batch (completions, masks, advantages) for each scale_rewards, made once."""
    batches, rows = {}, [{"prompt": p} for p in PROMPTS for _ in range(G)]  # TRL's RepeatSampler order
    for scale in SCALES:
        grpo_trainer.scale_rewards = scale
        batches[scale] = grpo_trainer._generate_and_score_completions(rows)
    return batches


def token_logprobs(model, input_ids, attention_mask, num_completion_tokens) -> torch.Tensor:
    """log q(y_t) of the last num_completion_tokens positions, [B·G, R], by a plain forward and log_softmax."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -num_completion_tokens - 1 : -1]
    completion_ids = input_ids[:, -num_completion_tokens:]
    return logits.log_softmax(dim=-1).gather(-1, completion_ids[..., None]).squeeze(-1)


def float64_logprobs_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
    """Stands in for GRPOTrainer._get_per_token_logps_and_entropies: (log-probs, entropies, aux loss)."""
    logprobs = token_logprobs(model, input_ids, attention_mask, logits_to_keep)
    return logprobs, torch.zeros_like(logprobs), None  # entropies only feed TRL's logged metrics


def model_inputs(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask, batch["completion_ids"].shape[1]


def flat_grad(loss, params) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_completion_lengths_differ_so_the_loss_types_differ(scored):
    lengths = torch.cat([batch["completion_mask"].sum(dim=1) for batch in scored.values()])
    assert lengths.min() < lengths.max() == MAX_COMPLETION_LENGTH


def test_plain_logprobs_agree_with_trl_kernel_to_float32_precision(grpo_trainer, scored):
    batch = scored["group"]
    with torch.no_grad():
        trl_logprobs = grpo_trainer.trl_logprobs_and_entropies(grpo_trainer.model, *model_inputs(batch))[0]
        plain = token_logprobs(grpo_trainer.model, *model_inputs(batch))
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(trl_logprobs.double()[mask], plain[mask], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("scale_rewards", SCALES)
def test_advantages_match_trl(scored, scale_rewards):
    expected = scored[scale_rewards]["advantages"].view(len(PROMPTS), G)
    torch.testing.assert_close(trainer_loss.advantages(REWARDS, scale_rewards), expected, rtol=1e-6, atol=1e-7)


def test_advantages_use_the_bessel_corrected_std():
    rewards = torch.tensor([[0.0, 1.0]])  # mean 0.5, unbiased std sqrt(0.5)
    expected = torch.tensor([[-0.5, 0.5]]) / (0.5**0.5 + 1e-4)
    torch.testing.assert_close(trainer_loss.advantages(rewards, "group"), expected)


@pytest.mark.parametrize("scale_rewards", SCALES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_coefficients_give_minus_the_gradient_of_trl_loss(grpo_trainer, scored, loss_type, scale_rewards, monkeypatch):
    batch, model = scored[scale_rewards], grpo_trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    monkeypatch.setattr(grpo_trainer, "loss_type", loss_type)
    trl_grad = flat_grad(grpo_trainer._compute_loss(model, batch), params)

    shape = (len(PROMPTS), G, -1)
    coefficients = trainer_loss.token_coefficients(
        trainer_loss.advantages(REWARDS, scale_rewards),
        batch["completion_mask"].view(shape),
        loss_type,
        max_completion_length=MAX_COMPLETION_LENGTH,
        num_tokens=batch["num_items_in_batch"],
    )
    y_bar = flat_grad((coefficients * token_logprobs(model, *model_inputs(batch)).view(shape)).sum(), params)
    assert ((y_bar + trl_grad).norm() / trl_grad.norm()).item() < 1e-6


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_global_counts_make_accumulated_microbatches_add_up_to_trl_step(grpo_trainer, scored, loss_type, monkeypatch):
    # One step = two microbatches of one prompt's G completions, gradient_accumulation_steps = steps_per_generation = 2.
    batch, model = scored["group"], grpo_trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    monkeypatch.setattr(grpo_trainer, "loss_type", loss_type)
    monkeypatch.setattr(grpo_trainer, "current_gradient_accumulation_steps", 2)
    monkeypatch.setattr(grpo_trainer.args, "steps_per_generation", 2)
    halves = [
        {key: value[rows] if value.dim() else value for key, value in batch.items()}  # num_items_in_batch stays global
        for rows in (slice(0, G), slice(G, 2 * G))
    ]
    trl_grad = sum(flat_grad(grpo_trainer._compute_loss(model, half), params) for half in halves)

    advantages, y_bar = trainer_loss.advantages(REWARDS, "group"), 0
    for prompt, half in enumerate(halves):
        coefficients = trainer_loss.token_coefficients(
            advantages[prompt : prompt + 1],
            half["completion_mask"].view(1, G, -1),
            loss_type,
            max_completion_length=MAX_COMPLETION_LENGTH,
            num_sequences=len(PROMPTS) * G,
            num_tokens=batch["num_items_in_batch"],
        )
        logprobs = token_logprobs(model, *model_inputs(half)).view(1, G, -1)
        y_bar = y_bar + flat_grad((coefficients * logprobs).sum(), params)
    assert ((y_bar + trl_grad).norm() / trl_grad.norm()).item() < 1e-6


def test_seed_coefficients_give_the_seed_update_direction():
    # log q(y_t) = a_t · θ; the seed's Ȳ = ∇ Σ_p L_Y(p) / B_U with L_Y(p) = (1/G) Σ_g A_g / L_max S(y_g).
    torch.manual_seed(0)
    theta, scores = torch.randn(3, requires_grad=True), torch.randn(2, 2, 4, 3)
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0]], [[1, 1, 1, 1], [1, 0, 0, 0]]])
    advantages, max_lengths = torch.tensor([[0.5, -0.5], [1.0, -1.0]]), torch.tensor([3.0, 4.0])
    seed_loss = estimators.update_loss((scores @ theta * mask).sum(dim=-1), advantages, max_lengths).sum() / 2  # B_U
    coefficients = trainer_loss.token_coefficients(advantages, mask, "seed", max_lengths=max_lengths)
    y_bar = flat_grad((coefficients * (scores @ theta)).sum(), [theta])
    torch.testing.assert_close(y_bar, flat_grad(seed_loss, [theta]))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "seed"])
def test_pieces_with_global_counts_add_up_to_the_whole_step(loss_type):
    torch.manual_seed(1)
    advantages, mask = torch.randn(4, 2), (torch.rand(4, 2, 5) < 0.7).long()
    max_lengths = torch.tensor([5.0, 4.0, 5.0, 3.0])
    coefficients = partial(trainer_loss.token_coefficients, loss_type=loss_type, max_completion_length=5)
    whole = coefficients(advantages, mask, max_lengths=max_lengths)
    step_counts = dict(num_sequences=8, num_tokens=mask.sum())
    pieces = [
        coefficients(advantages[rows], mask[rows], max_lengths=max_lengths[rows], **step_counts)
        for rows in (slice(0, 1), slice(1, 4))
    ]
    torch.testing.assert_close(torch.cat(pieces), whole)


def test_clip_factor_matches_torch_clip_grad_norm():
    grad = torch.tensor([3.0, 4.0])  # norm 5
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_([param], max_norm=0.5)
    torch.testing.assert_close(param.grad, grad * trainer_loss.clip_factor(5.0, 0.5))
    assert trainer_loss.clip_factor(5.0, 0.5) == pytest.approx(0.5 / (5.0 + 1e-6), rel=1e-12)


def test_clip_factor_is_one_below_the_threshold_or_without_clipping():
    assert trainer_loss.clip_factor(0.3, 1.0) == 1.0
    assert trainer_loss.clip_factor(50.0, None) == 1.0
    assert trainer_loss.clip_factor(50.0, 0.0) == 1.0  # HF Trainer clips only when max_grad_norm > 0


def test_settings_defaults_are_trl_grpo_config_defaults(tmp_path):
    config = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    settings = TrainerSettings()
    for field in dataclasses.fields(TrainerSettings):
        assert getattr(settings, field.name) == getattr(config, field.name), field.name


def test_settings_refuse_a_kl_term():
    with pytest.raises(ProbeConfigError, match=r"beta=0.04: the KL term"):
        TrainerSettings(beta=0.04)


def test_settings_refuse_a_loss_type_not_modelled():
    with pytest.raises(ProbeConfigError, match=r"loss_type='cispo' is not modelled"):
        TrainerSettings(loss_type="cispo")
