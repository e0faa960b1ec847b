"""The step the user's trainer really takes: TRL GRPOTrainer's advantages, loss and clipping (docs/math.md §5,
"Ȳ: the step your trainer takes"). Plain functions on tensors; no model, no Lightning, no TRL import.

Shapes: B prompts, G completions each, R response positions; response_mask [B, G, R] is 1 on the tokens
the loss counts. "The step" is one optimizer step on one generation batch: in TRL, with the default
steps_per_generation = gradient_accumulation_steps, the N_seq = B·G completions of all processes and all
accumulated microbatches. The probe's U batch plays that role: B = B_U.

Convention. The coefficients are detached c [B, G, R] (and, with an entropy bonus, c_H [B, G, R]) such that,
at the first optimizer step on fresh samples (importance ratio 1),

    ∇ ( Σ_{p,g,t} c_{p,g,t} log q(y_{p,g,t}) + Σ_{p,g,t} c_H,{p,g,t} H_{p,g,t} ) = −∇L_TRL = ∇J̄

(Ȳ before the geometry P ⊙ and clipping). The probe sums per-prompt pieces and divides by B_U
(Ȳ = P ⊙ Σ_p ∇J(p) / B_U), so its per-prompt piece is ∇J(p) = B_U · (prompt p's share of the sums above).

TRL's log q is log softmax(z/τ) with its temperature τ but without top-p/top-k truncation, even when it
samples with them; its entropies H_t are those of the same softmax(z/τ). With num_iterations > 1 or
steps_per_generation > gradient_accumulation_steps one generation batch feeds several optimizer steps: the
coefficients are those of the first (ratio 1); the later ones are off-policy and not predicted.
"""

from dataclasses import dataclass, field, replace
from typing import get_args

import torch

from probe_lightning.config import ImportanceSamplingLevel, LossType, ScaleRewards, require

STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)
ENTROPY_CONTROLLER_FILE = "entropy_ctrl_state.json"  # GRPOTrainer._save_checkpoint, with use_adaptive_entropy
# Loss types divided by the generation batch's token count (TRL's num_items_in_batch).
TOKEN_COUNT_LOSSES = ("dapo", "cispo", "vespo")
# Loss types whose policy gradient flows through the importance ratio coef_1 (TRL's clipped surrogate and
# sapo's soft gate, both of derivative 1 at ratio 1); cispo and vespo multiply log π by a detached weight.
RATIO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo")


@dataclass
class TrainerSettings:
    """The user's GRPOTrainer settings that shape its step, with TRL's names and TRL 1.16's GRPOConfig defaults.

    loss_type "seed" is the seed probe's own loss (A_g / L_max(p), docs/math.md), not a TRL one. The learning
    rate is not here: η comes from the optimizer state's param groups (optimizer_state.py) or model.learning_rate.
    last_world_entropy is not a GRPOConfig field but the adaptive entropy controller's state, saved beside the
    checkpoint (entropy_ctrl_state.json); None: no measurement yet (TRL's initial inf).
    Settings TRL validates itself (e.g. num_generations >= 2) are taken as they come.
    """

    loss_type: LossType = "dapo"
    scale_rewards: ScaleRewards = "group"
    max_completion_length: int | None = 512
    num_generations: int | None = 8
    max_grad_norm: float | None = 1.0  # None: no clipping (HF Trainer clips only when max_grad_norm > 0)
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    sync_ref_model: bool = False
    importance_sampling_level: ImportanceSamplingLevel = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    delta: float | None = None
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    mask_truncated_completions: bool = False
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    entropy_target: float = 0.2
    reward_weights: list[float] | None = None
    multi_objective_aggregation: str = "sum_then_normalize"
    router_aux_loss_coef: float | None = None  # None: the model config's
    num_iterations: int = 1
    steps_per_generation: int | None = 1  # None: gradient_accumulation_steps (GRPOConfig resolves it so)
    gradient_accumulation_steps: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    last_world_entropy: float | None = field(default=None, metadata={"saved_in": ENTROPY_CONTROLLER_FILE})

    def __post_init__(self):
        predicted = get_args(LossType)
        require(
            self.loss_type in predicted,
            f"trainer loss_type={self.loss_type!r} is not a loss this probe predicts (a newer TRL's?): "
            f"it predicts {', '.join(predicted)}",
        )
        require(
            self.scale_rewards in get_args(ScaleRewards),
            f"trainer scale_rewards={self.scale_rewards!r} must be one of {get_args(ScaleRewards)}",
        )
        require(
            self.importance_sampling_level in get_args(ImportanceSamplingLevel),
            f"trainer importance_sampling_level={self.importance_sampling_level!r} must be one of "
            f"{get_args(ImportanceSamplingLevel)}",
        )
        require(
            self.multi_objective_aggregation == "sum_then_normalize",
            f"trainer multi_objective_aggregation={self.multi_objective_aggregation!r}: the probe forms TRL's "
            "sum_then_normalize advantages (weighted sum of the rewards, then group normalisation); normalising each "
            "reward function before the sum is not modelled",
        )
        require(
            not (self.beta and self.sync_ref_model),
            f"trainer sync_ref_model=True with beta={self.beta}: the reference model is mixed into the policy during "
            "training and no checkpoint holds it, so the KL term's reference is unknown",
        )
        require(
            self.delta is None or self.delta >= 1,
            f"trainer delta={self.delta}: a cap below 1 clips the on-policy ratio itself (positive advantages then "
            "have no gradient); the probe predicts delta >= 1 or None",
        )
        require(
            self.loss_type == "cispo" or (self.epsilon >= 0 and self.epsilon_upper >= 0),
            f"trainer epsilon={self.epsilon}, epsilon_high={self.epsilon_high}: the clip range "
            f"[1 - epsilon, 1 + epsilon_high] must hold the on-policy ratio 1",
        )
        require(
            self.off_policy_mask_threshold is None or self.off_policy_mask_threshold >= 0,
            f"trainer off_policy_mask_threshold={self.off_policy_mask_threshold}: below 0 it drops every "
            "negative-advantage sequence even on-policy (KL 0); the probe predicts thresholds >= 0 (nothing dropped)",
        )
        require(
            0 <= self.top_entropy_quantile <= 1,
            f"trainer top_entropy_quantile={self.top_entropy_quantile} must be in [0, 1]",
        )
        for name in ("num_iterations", "gradient_accumulation_steps"):
            require(getattr(self, name) >= 1, f"trainer {name}={getattr(self, name)} must be >= 1")
        require(
            self.steps_per_generation is None or self.steps_per_generation >= 1,
            f"trainer steps_per_generation={self.steps_per_generation} must be >= 1",
        )
        options = self.loss_options()
        require(
            self.loss_type != "seed" or not options,
            f"trainer loss_type='seed' is the seed probe's own loss, and {options[0] if options else ''} "
            "belongs to TRL's: choose a TRL loss_type",
        )
        require(
            self.loss_type != "dr_grpo" or (self.max_completion_length or 0) >= 1,
            f"trainer loss_type='dr_grpo' needs max_completion_length >= 1, got {self.max_completion_length}",
        )

    def loss_options(self) -> list[str]:
        """"name=value" of each TRL option beyond the classic loss that this step uses."""
        options = {
            "beta": self.beta != 0, "entropy_coef": self.entropy_coef != 0,
            "use_adaptive_entropy": self.use_adaptive_entropy, "top_entropy_quantile": self.top_entropy_quantile < 1,
            "mask_truncated_completions": self.mask_truncated_completions,
            "importance_sampling_level": self.importance_sampling_level != "token",
        }  # fmt: skip
        return [f"{name}={getattr(self, name)!r}" for name, used in options.items() if used]

    @property
    def epsilon_upper(self) -> float:
        """TRL's epsilon_high: the upper clip (cispo: the ratio's clamp), epsilon when unset."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def policy_scale(self) -> float:
        """The policy term's factor at ratio 1: cispo's detached clamp min(1, epsilon_high); 1 for the others
        (the clipped surrogate, sapo's gate and vespo's φ all have derivative or value 1 there)."""
        return min(1.0, self.epsilon_upper) if self.loss_type == "cispo" else 1.0

    @property
    def entropy_bonus(self) -> float:
        """The entropy bonus's coefficient at the next step: entropy_coef; with use_adaptive_entropy entropy_coef
        only when the entropy the controller last measured is at most entropy_target, else 0 (TRL's gate)."""
        if not self.use_adaptive_entropy:
            return self.entropy_coef
        measured = self.last_world_entropy
        return self.entropy_coef if measured is not None and measured <= self.entropy_target else 0.0

    @property
    def needs_whole_batch(self) -> bool:
        """Whether a token's coefficient needs the whole generation batch first: the entropy mask's quantile, the
        bonus's token count, the token count without truncated completions, the KL's reference log-probs."""
        entropy = self.top_entropy_quantile < 1 or self.entropy_bonus != 0
        return entropy or self.beta != 0 or self.mask_truncated_completions

    @property
    def optimizer_steps_per_generation(self) -> int:
        """Optimizer steps the trainer takes on one generation batch: num_iterations passes over it, each in
        steps_per_generation / gradient_accumulation_steps steps. δH₁ predicts the first."""
        steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
        return self.num_iterations * max(1, steps_per_generation // self.gradient_accumulation_steps)


def advantages(rewards: torch.Tensor, scale_rewards: ScaleRewards) -> torch.Tensor:
    """TRL's A_g = (r_g − mean_group r) / (std + 1e-4), [B, G] -> [B, G]; std is Bessel-corrected (TRL's nanstd).

    none: no division; group: std over the prompt's G rewards; batch: std over all B·G rewards (still the
    group mean). For "batch", rewards must be the whole generation batch (TRL gathers all processes first).
    A NaN reward (no reward function scored the response) is left out of the mean and std, and its advantage
    is 0, as TRL's: nanmean, nanstd, then NaN -> 0.
    """
    centred = rewards - rewards.nanmean(dim=1, keepdim=True)
    if scale_rewards == "none" or rewards.shape[1] == 1:  # one response: A = 0, and its std is undefined
        scaled = centred
    elif scale_rewards == "group":
        scaled = centred / (nanstd(rewards, dim=1) + STD_EPS)
    elif scale_rewards == "batch":
        scaled = centred / (nanstd(rewards) + STD_EPS)
    else:
        raise ValueError(f"scale_rewards must be one of {get_args(ScaleRewards)}, got {scale_rewards!r}")
    return scaled.nan_to_num(nan=0.0)


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """TRL's nanstd: the Bessel-corrected std of the non-NaN values (NaN for fewer than two); dim kept."""
    mean = values.nanmean(dim=dim, keepdim=True)
    variance = ((values - mean) ** 2).nanmean(dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, torch.nan))
    return (variance * correction).sqrt()


def loss_normaliser(
    loss_type: LossType,
    response_mask: torch.Tensor,
    *,
    max_completion_length: int | None = None,
    max_lengths: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """N, broadcastable to [B, G, R]: TRL aggregates its per-token loss ℓ as L = Σ_{g,t} m ℓ / N (the whole step).

    With m the mask, N_seq = num_sequences and N_tok = num_tokens, both counted over the whole step (all
    microbatches, all processes; default: this tensor's B·G sequences and Σm tokens):

        grpo, sapo:           N = N_seq · Σ_t m_g          mean over sequences of each sequence's token mean
        bnpo:                 N = Σ m · N_seq / (B·G)      token mean of this local batch, averaged over batches
        dr_grpo:              N = N_seq · max_completion_length
        dapo, cispo, vespo:   N = N_tok                    TRL's num_items_in_batch, all processes
        luspo:                N = N_seq                    each sequence's token sum, mean over sequences
        seed:                 N = L_max(p) · N_seq         the seed's (1/B_U)(1/G) Σ A_g / L_max(p) ∇S(y_g)

    Only bnpo depends on how the step is split (TRL averages local token means): give it TRL's local batches.
    max_lengths [B] (L_max(p)) is required for "seed", max_completion_length for "dr_grpo".
    """
    B, G = response_mask.shape[:2]
    mask = response_mask.to(torch.promote_types(response_mask.dtype, torch.float32))
    num_sequences = B * G if num_sequences is None else num_sequences
    if loss_type in ("grpo", "sapo"):
        return num_sequences * mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
    if loss_type == "bnpo":
        return mask.sum().clamp(min=1.0) * (num_sequences / (B * G))
    if loss_type == "dr_grpo":
        require(max_completion_length is not None, "loss_type='dr_grpo' needs max_completion_length")
        return mask.new_tensor(float(num_sequences * max_completion_length))
    if loss_type in TOKEN_COUNT_LOSSES:
        tokens = mask.sum() if num_tokens is None else num_tokens
        return torch.as_tensor(tokens, dtype=mask.dtype, device=mask.device).clamp(min=1.0)
    if loss_type == "luspo":
        return mask.new_tensor(float(num_sequences))
    if loss_type == "seed":
        require(max_lengths is not None, "loss_type='seed' needs max_lengths (L_max per prompt)")
        return max_lengths.to(mask.dtype)[:, None, None] * num_sequences
    raise ValueError(f"loss_type must be one of {get_args(LossType)}, got {loss_type!r}")


def token_coefficients(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int | None = None,
    max_lengths: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    sequence_level: bool = False,
    epsilon_high: float | None = None,
) -> torch.Tensor:
    """The policy term's detached c [B, G, R]: ∇ Σ c·log q = −∇ of TRL's policy loss for the step at ratio 1.

        c = A_g · w_{g,t} · s / N       (N: loss_normaliser; passing global counts lets a caller split the step
                                         into pieces whose coefficients add up exactly)

    w = m, or m · keep with TRL's entropy mask (top_entropy_quantile). With importance_sampling_level "sequence"
    (sequence_level) the ratio is exp(mean_t log ratio), whose gradient spreads over the sequence's tokens: for
    the losses through the ratio (RATIO_LOSSES) w_{g,t} = m_{g,t} · Σ_s w_{g,s} / Σ_s m_{g,s}, the same as "token"
    without an entropy mask. s = min(1, epsilon_high) for cispo (its detached clamp of the ratio 1), else 1.
    """
    mask = response_mask.to(advantages.dtype)
    weights = mask if keep is None else mask * keep.to(mask.dtype)
    if sequence_level and loss_type in RATIO_LOSSES:
        weights = mask * weights.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
    if loss_type == "cispo":
        require(epsilon_high is not None, "loss_type='cispo' needs epsilon_high (TRL's clamp of the ratio)")
        weights = weights * min(1.0, epsilon_high)
    normaliser = loss_normaliser(
        loss_type, mask, max_completion_length=max_completion_length, max_lengths=max_lengths,
        num_sequences=num_sequences, num_tokens=num_tokens,
    )  # fmt: skip
    return advantages.detach()[..., None] * weights / normaliser


def kl_gradient(
    token_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    bias_correction: bool,
    sequence_level: bool,
) -> torch.Tensor:
    """∂/∂log π(y_t) of Σ_t m_t k_t (· coef_1 with bias correction) at ratio 1, [B, G, R], detached.

    TRL's estimator k = exp(ref − log π) − (ref − log π) − 1 (k3) has ∂k/∂log π = 1 − exp(ref − log π).
    use_bias_correction_kl multiplies k by the importance ratio coef_1 (value 1, gradient ∂coef_1/∂log π_s =
    1 per token, or m_s / Σm with importance_sampling_level "sequence"), which adds k_t itself, or the
    sequence's Σ_t m_t k_t / Σ_t m_t spread over its tokens.
    """
    mask = response_mask.to(token_logprobs.dtype)
    difference = (ref_logprobs - token_logprobs).detach() * mask  # 0 off the mask, where the loss has no term
    kl = difference.exp() - difference - 1
    gradient = (1 - difference.exp()) * mask
    if not bias_correction:
        return gradient
    if sequence_level:
        return gradient + mask * (kl * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return gradient + kl * mask


def trainer_coefficients(
    trainer: TrainerSettings,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    max_lengths: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    token_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    bonus_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(c, c_H), detached [B, G, R]: ∇(Σ c log q + Σ c_H H) = −∇ of TRL's _compute_loss for the step at ratio 1.

    c is the policy term (token_coefficients, with the trainer's loss type, entropy mask `keep`, importance
    sampling level and cispo clamp) minus β · kl_gradient / N, N the policy's normaliser (TRL adds β k to the
    per-token loss before aggregating; the entropy mask does not apply to it). token_logprobs and ref_logprobs
    [B, G, R] (log π and the reference's, under softmax(z/τ)) are needed with beta != 0.
    c_H is the entropy bonus's, on the entropies (a pathwise gradient of H_t, not a score): TRL's loss subtracts
    coef · Σ H m_eff / Σ m_eff with m_eff = m · keep, so c_H = coef · m_eff / bonus_tokens (default: Σ m_eff of
    this tensor); None without a bonus.
    response_mask is TRL's loss mask: with mask_truncated_completions, completions without EOS are 0.
    """
    counts = dict(max_lengths=max_lengths, num_sequences=num_sequences, num_tokens=num_tokens)
    level = trainer.importance_sampling_level == "sequence"
    coefficients = token_coefficients(
        advantages, response_mask, trainer.loss_type, max_completion_length=trainer.max_completion_length,
        keep=keep, sequence_level=level, epsilon_high=trainer.epsilon_upper, **counts,
    )  # fmt: skip
    mask = response_mask.to(coefficients.dtype)
    if trainer.beta:
        require(token_logprobs is not None and ref_logprobs is not None, "beta != 0 needs log π and the reference's")
        kl = kl_gradient(
            token_logprobs, ref_logprobs, mask, bias_correction=trainer.use_bias_correction_kl, sequence_level=level
        )
        normaliser = loss_normaliser(
            trainer.loss_type, mask, max_completion_length=trainer.max_completion_length, **counts
        )
        coefficients = coefficients - trainer.beta * kl.to(coefficients.dtype) / normaliser
    if not trainer.entropy_bonus:
        return coefficients, None
    effective = mask if keep is None else mask * keep.to(mask.dtype)
    tokens = effective.sum() if bonus_tokens is None else bonus_tokens
    tokens = torch.as_tensor(tokens, dtype=mask.dtype, device=mask.device).clamp(min=1.0)
    return coefficients, trainer.entropy_bonus * effective / tokens


def entropy_threshold(entropies: torch.Tensor, top_entropy_quantile: float) -> float:
    """TRL's get_high_entropy_mask threshold: the (1 − ρ) quantile of the loss tokens' entropies (1-D: every
    loss token of the batch, all processes), taken in float32 as TRL takes it; a token is kept when H_t >= it.
    No tokens: inf (none kept)."""
    if entropies.numel() == 0:
        return float("inf")
    return torch.quantile(entropies.detach().float().cpu(), 1 - top_entropy_quantile).item()


def truncated_completions(last_tokens: torch.Tensor, eos_token_ids: list[int], pad_token_id: int) -> torch.Tensor:
    """TRL's mask_truncated_completions test: a completion whose last token is neither an EOS nor the pad token
    ran out of max_completion_length. last_tokens [...] -> bool [...]."""
    ends = torch.tensor([*eos_token_ids, pad_token_id], device=last_tokens.device)
    return ~torch.isin(last_tokens, ends)


def check_router_loss(trainer: TrainerSettings, model_config) -> None:
    """TRL adds a Mixture-of-Experts model's load-balancing loss (router_aux_loss_coef, else the model config's)
    to its step; the probe does not model it, so such a step is refused."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    coefficient = trainer.router_aux_loss_coef
    coefficient = getattr(config, "router_aux_loss_coef", 0.0) if coefficient is None else coefficient
    require(
        not (hasattr(config, "output_router_logits") and coefficient),
        f"trainer router_aux_loss_coef={coefficient}: the model is a Mixture-of-Experts model and TRL adds its "
        "routers' load-balancing loss to the step, which the probe does not model",
    )


def one_local_batch(trainer: TrainerSettings) -> TrainerSettings:
    """The settings for the probe's U batch taken as one local batch: bnpo's local token mean is then dapo's token
    mean of the whole batch (results.json notes it)."""
    return replace(trainer, loss_type="dapo") if trainer.loss_type == "bnpo" else trainer


def clip_factor(grad_norm: float, max_grad_norm: float | None) -> float:
    """HF Trainer's clipping as a scalar on the step's gradient: min(1, max_grad_norm / (‖g‖ + 1e-6)).

    HF Trainer clips through accelerate into torch.nn.utils.clip_grad_norm_, and only when max_grad_norm > 0.
    """
    if max_grad_norm is None or max_grad_norm <= 0:
        return 1.0
    return min(1.0, max_grad_norm / (grad_norm + CLIP_EPS))
