"""trainer_loss against TRL's own GRPOTrainer code: its advantages, its loss's gradient, torch's clipping.

TRL's code is called on a GRPOTrainer built around a tiny random Llama: `_generate_and_score_completions`
samples completions and turns the rewards of a fixed reward function into advantages, and `_compute_loss`
gives the loss whose gradient the trainer follows, here at the first optimizer step on fresh samples (no
old log-probs: importance ratio 1). The trainer's attributes (loss_type, entropy_coef, beta, ...) are
switched between cases as GRPOTrainer.__init__ sets them from a GRPOConfig, instead of building a trainer
per case.

TRL computes log-probs and entropies with a fused LM-head kernel that accumulates in float32 whatever the
model's dtype, which limits any gradient comparison to about 1e-5 relative. To check the loss code to 1e-6,
the model is float64 and the trainer's log-prob method is replaced by a plain float64 log_softmax and entropy
(which agree with TRL's kernel to float32 precision, tested below); everything after them is TRL's own code.
"""

import dataclasses
import math
import types
from functools import partial

import datasets
import pytest
import torch
import transformers
import trl
from tiny_models import tiny_llama

from probe_lightning import estimators, trainer_loss
from probe_lightning.config import ProbeConfigError
from probe_lightning.data import PromptBatch
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.trainer_loss import TrainerSettings

PROMPTS = ["The cat sat", "Two plus two is"]
G = 3
MAX_COMPLETION_LENGTH = 10
REWARDS = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.9, 0.3]])  # [B, G], what the reward function returns
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
SCALES = ["none", "group", "batch"]
REWARD_WEIGHTS = [1.0, 0.5]


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


def length_reward(completion_ids, **kwargs) -> list[float]:
    return [len(ids) / MAX_COMPLETION_LENGTH for ids in completion_ids]


def first_token_reward(completion_ids, **kwargs) -> list[float | None]:
    """Scores only completions of even length: a function that returns None for some."""
    return [None if len(ids) % 2 else float(ids[0] % 3) for ids in completion_ids]


@pytest.fixture(scope="module")
def truncated_batch(grpo_trainer):
    """A generation batch with mask_truncated_completions: completions without EOS leave the loss mask."""
    grpo_trainer.scale_rewards, grpo_trainer.mask_truncated_completions = "group", True
    with torch.random.fork_rng():
        torch.manual_seed(13)  # a draw with truncated and ended completions (EOS is likely in this model)
        batch = grpo_trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    grpo_trainer.mask_truncated_completions = False
    return batch


@pytest.fixture(scope="module")
def weighted_batch(grpo_trainer):
    """A generation batch scored by two reward functions with reward_weights (the args' weights, as
    GRPOTrainer.__init__ turns them into its attributes)."""
    saved = {name: getattr(grpo_trainer, name) for name in
             ("reward_funcs", "reward_func_names", "reward_processing_classes", "reward_weights")}  # fmt: skip
    grpo_trainer.reward_funcs = [length_reward, first_token_reward]
    grpo_trainer.reward_func_names = ["length_reward", "first_token_reward"]
    grpo_trainer.reward_processing_classes = [None, None]
    grpo_trainer.reward_weights = torch.tensor(REWARD_WEIGHTS)
    grpo_trainer.scale_rewards = "group"
    batch = grpo_trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    for name, value in saved.items():
        setattr(grpo_trainer, name, value)
    return batch


@pytest.fixture(scope="module")
def reference_model(tokenizer):
    """The KL term's reference: another tiny model over the same vocabulary."""
    return tiny_llama(tokenizer, seed=1, eos_scale=5.0).double().requires_grad_(False)


def scores(model, input_ids, attention_mask, num_completion_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y_t), H_t) of the last num_completion_tokens positions, [B·G, R] each, by a plain float64 forward:
    H_t the entropy of softmax(logits), 0 where the attention mask is (as TRL's kernel leaves it)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -num_completion_tokens - 1 : -1]
    completion_ids = input_ids[:, -num_completion_tokens:]
    logq = logits.log_softmax(dim=-1)
    entropies = -(logq.exp() * logq).sum(-1) * attention_mask[:, -num_completion_tokens:]
    return logq.gather(-1, completion_ids[..., None]).squeeze(-1), entropies


def token_logprobs(model, input_ids, attention_mask, num_completion_tokens) -> torch.Tensor:
    """log q(y_t) of the last num_completion_tokens positions, [B·G, R], by a plain forward and log_softmax."""
    return scores(model, input_ids, attention_mask, num_completion_tokens)[0]


def float64_logprobs_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
    """Stands in for GRPOTrainer._get_per_token_logps_and_entropies: (log-probs, entropies, aux loss)."""
    return *scores(model, input_ids, attention_mask, logits_to_keep), None


def model_inputs(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask, batch["completion_ids"].shape[1]


def flat_grad(loss, params) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_completion_lengths_differ_so_the_loss_types_differ(scored):
    lengths = torch.cat([batch["completion_mask"].sum(dim=1) for batch in scored.values()])
    assert lengths.min() < lengths.max() == MAX_COMPLETION_LENGTH


def test_plain_logprobs_and_entropies_agree_with_trl_kernel_to_float32_precision(grpo_trainer, scored):
    batch = scored["group"]
    with torch.no_grad():
        trl_logprobs, trl_entropies, _ = grpo_trainer.trl_logprobs_and_entropies(
            grpo_trainer.model, *model_inputs(batch), compute_entropy=True
        )
        plain_logprobs, plain_entropies = scores(grpo_trainer.model, *model_inputs(batch))
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(trl_logprobs.double()[mask], plain_logprobs[mask], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(trl_entropies.double()[mask], plain_entropies[mask], rtol=1e-6, atol=1e-5)


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


# ---- every option that changes the step, against TRL's _compute_loss at ratio 1 ----

# name: (TrainerSettings beyond TRL's defaults, whether TRL's gradient differs from the default dapo step's)
OPTIONS = {
    "cispo": (dict(loss_type="cispo"), True),  # epsilon_high = epsilon = 0.2: its clamp scales the step by 0.2
    "cispo_epsilon_high_5": (dict(loss_type="cispo", epsilon_high=5.0), False),  # min(1, 5) = 1: dapo's step
    "sapo": (dict(loss_type="sapo"), True),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), True),
    "luspo_token_level": (dict(loss_type="luspo"), True),
    "vespo": (dict(loss_type="vespo"), False),  # φ(1) = 1: dapo's step
    "grpo_sequence_level": (dict(loss_type="grpo", importance_sampling_level="sequence"), True),
    "dapo_sequence_level": (dict(importance_sampling_level="sequence"), False),
    "delta_and_off_policy_mask": (dict(delta=1.5, off_policy_mask_threshold=0.5), False),  # inactive at ratio 1
    "entropy_bonus": (dict(entropy_coef=0.3), True),
    "entropy_bonus_grpo": (dict(loss_type="grpo", entropy_coef=0.3), True),
    "adaptive_entropy_gate_open": (
        dict(use_adaptive_entropy=True, entropy_coef=0.3, entropy_target=20.0, last_world_entropy=5.0), True),
    "adaptive_entropy_gate_closed": (dict(use_adaptive_entropy=True, entropy_coef=0.3, last_world_entropy=5.0), False),
    "adaptive_entropy_no_measurement": (dict(use_adaptive_entropy=True, entropy_coef=0.3), False),
    "top_entropy_quantile": (dict(top_entropy_quantile=0.2), True),
    "top_entropy_quantile_grpo": (dict(loss_type="grpo", top_entropy_quantile=0.2), True),
    "top_entropy_quantile_grpo_sequence_level": (
        dict(loss_type="grpo", importance_sampling_level="sequence", top_entropy_quantile=0.2), True),
    "top_entropy_quantile_cispo_sequence_level": (
        dict(loss_type="cispo", epsilon_high=5.0, importance_sampling_level="sequence", top_entropy_quantile=0.2),
        True),
    "top_entropy_quantile_with_bonus": (dict(top_entropy_quantile=0.2, entropy_coef=0.3), True),
    "kl": (dict(beta=0.5), True),
    "kl_without_bias_correction": (dict(beta=0.5, use_bias_correction_kl=False), True),
    "kl_grpo_sequence_level": (dict(loss_type="grpo", beta=0.5, importance_sampling_level="sequence"), True),
    "kl_grpo_sequence_level_without_bias_correction": (
        dict(loss_type="grpo", beta=0.5, importance_sampling_level="sequence", use_bias_correction_kl=False), True),
    "kl_luspo": (dict(loss_type="luspo", beta=0.5), True),
    "kl_with_top_entropy_quantile_and_bonus": (dict(beta=0.5, top_entropy_quantile=0.5, entropy_coef=0.3), True),
}  # fmt: skip


def use_settings(trainer, settings: TrainerSettings, monkeypatch) -> None:
    """The trainer's attributes and args as GRPOTrainer.__init__ sets them from a GRPOConfig with these settings,
    the adaptive controller's state as _load_optimizer_and_scheduler restores it from a checkpoint."""
    names = ("loss_type", "beta", "importance_sampling_level", "top_entropy_quantile", "entropy_coef",
             "use_adaptive_entropy", "off_policy_mask_threshold")  # fmt: skip
    for name in names:
        monkeypatch.setattr(trainer, name, getattr(settings, name))
    monkeypatch.setattr(trainer, "epsilon_low", settings.epsilon)
    monkeypatch.setattr(trainer, "epsilon_high", settings.epsilon_upper)
    monkeypatch.setattr(trainer, "_entropy_bonus_enabled", settings.entropy_coef != 0 or settings.use_adaptive_entropy)
    measured = settings.last_world_entropy
    monkeypatch.setattr(trainer, "_last_world_entropy", math.inf if measured is None else measured)
    for name in ("use_bias_correction_kl", "entropy_target", "delta"):
        monkeypatch.setattr(trainer.args, name, getattr(settings, name))


def trl_gradient(trainer, batch, settings, reference_model, monkeypatch) -> torch.Tensor:
    """∇ of TRL's _compute_loss on the batch (with the reference's log-probs when beta != 0)."""
    use_settings(trainer, settings, monkeypatch)
    if settings.beta:
        with torch.no_grad():
            batch = {**batch, "ref_per_token_logps": token_logprobs(reference_model, *model_inputs(batch))}
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return flat_grad(trainer._compute_loss(trainer.model, batch), params)


def probe_gradient(model, batch, settings, rewards, reference_model) -> torch.Tensor:
    """∇(Σ c log π + Σ c_H H) with trainer_coefficients' c, c_H for the batch as one step."""
    shape = (len(PROMPTS), G, -1)
    logprobs, entropies = (x.view(shape) for x in scores(model, *model_inputs(batch)))
    mask = batch["completion_mask"].view(shape)
    keep = None
    if settings.top_entropy_quantile < 1:  # the probe's selection: its threshold over the batch's loss tokens
        h = entropies.detach()
        keep = h >= trainer_loss.entropy_threshold(h[mask.bool()], settings.top_entropy_quantile)
    ref_logprobs = None
    if settings.beta:
        with torch.no_grad():
            ref_logprobs = token_logprobs(reference_model, *model_inputs(batch)).view(shape)
    coefficients, bonus = trainer_loss.trainer_coefficients(
        settings, trainer_loss.advantages(rewards, settings.scale_rewards), mask,
        num_tokens=batch["num_items_in_batch"], keep=keep, token_logprobs=logprobs.detach(), ref_logprobs=ref_logprobs,
    )  # fmt: skip
    objective = (coefficients * logprobs).sum() + (0 if bonus is None else (bonus * entropies).sum())
    return flat_grad(objective, [p for p in model.parameters() if p.requires_grad])


def clipped(gradient: torch.Tensor, max_grad_norm: float | None) -> torch.Tensor:
    """The HF Trainer's clipping, by torch's own clip_grad_norm_."""
    if max_grad_norm is None:
        return gradient
    param = torch.nn.Parameter(torch.zeros_like(gradient))
    param.grad = gradient.clone()
    torch.nn.utils.clip_grad_norm_([param], max_norm=max_grad_norm)
    return param.grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_gives_minus_the_gradient_of_trl_loss(
    grpo_trainer, scored, reference_model, monkeypatch, option, max_grad_norm
):
    settings = TrainerSettings(**OPTIONS[option][0], max_grad_norm=max_grad_norm)
    batch = scored["group"]
    trl_grad = clipped(trl_gradient(grpo_trainer, batch, settings, reference_model, monkeypatch), max_grad_norm)
    probe = probe_gradient(grpo_trainer.model, batch, settings, REWARDS, reference_model)
    clip = trainer_loss.clip_factor(probe.norm().item(), settings.max_grad_norm)
    assert (clip < 1) == (max_grad_norm is not None)
    assert relative_error(clip * probe, -trl_grad) < 1e-6


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_changes_trl_step_where_the_docs_say(grpo_trainer, scored, reference_model, monkeypatch, option):
    """The comparison above has power: an option that changes TRL's step is not lost in its tolerance."""
    settings, changes = TrainerSettings(**OPTIONS[option][0]), OPTIONS[option][1]
    batch = scored["group"]
    dapo = trl_gradient(grpo_trainer, batch, TrainerSettings(), reference_model, monkeypatch)
    with_option = trl_gradient(grpo_trainer, batch, settings, reference_model, monkeypatch)
    assert (relative_error(with_option, dapo) > 1e-3) == changes


@pytest.mark.parametrize(
    "options",
    [dict(), dict(loss_type="grpo"), dict(top_entropy_quantile=0.5, entropy_coef=0.3),
     dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.5, top_entropy_quantile=0.5,
          entropy_coef=0.3)],
    ids=["dapo", "grpo", "entropy_mask_and_bonus", "everything"],
)  # fmt: skip
def test_mask_truncated_completions_matches_trl(grpo_trainer, truncated_batch, reference_model, monkeypatch, options):
    settings = TrainerSettings(mask_truncated_completions=True, **options)
    mask, completions = truncated_batch["completion_mask"], truncated_batch["completion_ids"]
    masked = mask.sum(dim=1) == 0
    assert 0 < masked.sum() < len(masked), "the batch needs truncated and ended completions"
    lengths = torch.where(masked, completions.shape[1], mask.sum(dim=1))  # a truncated one fills the budget
    last_tokens = completions.gather(1, lengths[:, None] - 1).squeeze(1)
    eos, pad = grpo_trainer.eos_token_ids, grpo_trainer._tokenizer.pad_token_id
    assert torch.equal(trainer_loss.truncated_completions(last_tokens, eos, pad), masked)  # the probe's rule is TRL's
    trl_grad = trl_gradient(grpo_trainer, truncated_batch, settings, reference_model, monkeypatch)
    probe = probe_gradient(grpo_trainer.model, truncated_batch, settings, REWARDS, reference_model)
    assert relative_error(probe, -trl_grad) < 1e-6


def test_reward_weights_with_two_reward_functions_match_trl(grpo_trainer, weighted_batch, reference_model, monkeypatch):
    """The probe's reward functions (reward_functions.py, called per prompt) with the checkpoint's weights give
    TRL's advantages and so its step."""
    mask = weighted_batch["completion_mask"].bool()
    ids = [row[m].tolist() for row, m in zip(weighted_batch["completion_ids"], mask)]
    prompts = PromptBatch(0, "U", PROMPTS, [None] * len(PROMPTS), list(range(len(PROMPTS))), last_in_probe=True)
    functions = RewardFunctions([length_reward, first_token_reward], weights=REWARD_WEIGHTS)
    per_prompt = [ids[b * G : (b + 1) * G] for b in range(len(PROMPTS))]
    rewards = functions.score(prompts, [[""] * G] * len(PROMPTS), per_prompt)
    assert rewards.isnan().sum() == 0 and first_token_reward(ids).count(None) > 0  # None from one function only
    expected = weighted_batch["advantages"].view(len(PROMPTS), G)
    torch.testing.assert_close(trainer_loss.advantages(rewards, "group"), expected, rtol=1e-6, atol=1e-7)
    settings = TrainerSettings(reward_weights=REWARD_WEIGHTS)
    trl_grad = trl_gradient(grpo_trainer, weighted_batch, settings, reference_model, monkeypatch)
    probe = probe_gradient(grpo_trainer.model, weighted_batch, settings, rewards, reference_model)
    assert relative_error(probe, -trl_grad) < 1e-6


# ---- at ratio 1: what each loss type reduces to (docs/math.md §5) ----

# loss_type: (factor s, normaliser N of the mask m [B·G, R]); TRL's step at ratio 1 is Σ s A m ∇log π / N.
N_SEQ = len(PROMPTS) * G
RATIO_ONE = {
    "grpo": (1.0, lambda m: N_SEQ * m.sum(-1, keepdim=True)),
    "bnpo": (1.0, lambda m: m.sum()),
    "dr_grpo": (1.0, lambda m: N_SEQ * MAX_COMPLETION_LENGTH),
    "dapo": (1.0, lambda m: m.sum()),
    "cispo": (0.2, lambda m: m.sum()),  # min(1, epsilon_high), epsilon_high = epsilon = 0.2 by default
    "sapo": (1.0, lambda m: N_SEQ * m.sum(-1, keepdim=True)),
    "luspo": (1.0, lambda m: N_SEQ),
    "vespo": (1.0, lambda m: m.sum()),
}


@pytest.mark.parametrize("loss_type", RATIO_ONE)
def test_at_ratio_one_each_loss_type_is_a_scaled_normalised_policy_gradient(grpo_trainer, scored, monkeypatch,
                                                                           loss_type):
    batch, model = scored["group"], grpo_trainer.model
    monkeypatch.setattr(grpo_trainer, "loss_type", loss_type)
    params = [p for p in model.parameters() if p.requires_grad]
    trl_grad = flat_grad(grpo_trainer._compute_loss(model, batch), params)
    factor, normaliser = RATIO_ONE[loss_type]
    mask = batch["completion_mask"].double()
    advantages = batch["advantages"].double()[:, None]
    logprobs = token_logprobs(model, *model_inputs(batch))
    reduced = flat_grad((factor * advantages * mask / normaliser(mask) * logprobs).sum(), params)
    assert relative_error(reduced, -trl_grad) < 1e-6


# ---- the settings (last: a GRPOConfig built here resets accelerate's state, which the trainer above reads) ----


def test_settings_defaults_are_trl_grpo_config_defaults(tmp_path):
    config = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    settings = TrainerSettings()
    for field in dataclasses.fields(TrainerSettings):
        if "saved_in" in field.metadata:  # the entropy controller's state, not a GRPOConfig field
            continue
        assert getattr(settings, field.name) == getattr(config, field.name), field.name


def test_a_loss_type_from_a_newer_trl_is_refused_naming_it_and_the_predicted_ones():
    with pytest.raises(ProbeConfigError) as error:
        TrainerSettings(loss_type="gmpo")
    message = str(error.value)
    assert "\n" not in message and "loss_type='gmpo' is not a loss this probe predicts" in message
    assert "grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo" in message


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        (dict(multi_objective_aggregation="normalize_then_sum"), "multi_objective_aggregation='normalize_then_sum'"),
        (dict(beta=0.04, sync_ref_model=True), r"sync_ref_model=True with beta=0.04: the reference model"),
        (dict(delta=0.8), r"delta=0.8: a cap below 1 clips the on-policy ratio"),
        (dict(off_policy_mask_threshold=-0.1), r"off_policy_mask_threshold=-0.1: below 0 it drops"),
        (dict(epsilon=-0.1), r"epsilon=-0.1, epsilon_high=None: the clip range"),
        (dict(importance_sampling_level="batch"), r"importance_sampling_level='batch' must be one of"),
        (dict(loss_type="seed", entropy_coef=0.01), r"loss_type='seed' is the seed probe's own loss, and entropy_coef"),
    ],
)
def test_settings_the_probe_does_not_predict_are_refused_in_one_line(settings, refusal):
    with pytest.raises(ProbeConfigError, match=refusal) as error:
        TrainerSettings(**settings)
    assert "\n" not in str(error.value)


def test_a_mixture_of_experts_load_balancing_loss_is_refused():
    moe = types.SimpleNamespace(output_router_logits=False, router_aux_loss_coef=0.001)  # a MoE config's fields
    with pytest.raises(ProbeConfigError, match=r"router_aux_loss_coef=0.001: the model is a Mixture-of-Experts"):
        trainer_loss.check_router_loss(TrainerSettings(), moe)
    trainer_loss.check_router_loss(TrainerSettings(router_aux_loss_coef=0.0), moe)  # turned off: no such loss
    trainer_loss.check_router_loss(TrainerSettings(), tiny_llama_config())  # a dense model has none


def tiny_llama_config():
    return transformers.LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
