"""Real TRL GRPOTrainer runs on a tiny model on CPU, with one optimizer step recorded exactly as TRL takes it.

`run_grpo` trains a tiny random Llama (float32, EOS likely enough that completion lengths differ) for
STEPS steps with save_steps=1, so checkpoint-N and checkpoint-N+1 frame the recorded step N+1
(N = RECORDED_AFTER). One optimizer step is one generation batch: PROMPTS × G rows, no gradient
accumulation, steps_per_generation 1, num_iterations 1, so the step is on-policy. For that step it keeps

- the generation batch as `_generate_and_score_completions` returned it, before TRL shuffles its rows
  (RepeatSampler order: each prompt's G completions together), and its rewards (the reward function called
  again on its completions);
- p.grad of every trainable parameter at `on_pre_optimizer_step`: after the loss, the backward and the
  HF Trainer's clipping, i.e. what AdamW receives;
- the optimizer's param groups as parameter names, in the order AdamW holds them.

Independently of the probe's code, `trl_gradient` recomputes that gradient from TRL's own batch (TRL's loss
formulas, on-policy, then torch's clipping) and `adamw_step` re-enacts the optimizer step in float64 with
torch.optim.AdamW loaded from checkpoint-N's optimizer.pt.

Names: everything is keyed by the checkpoint's weights-file keys (model.safetensors for full fine-tuning,
adapter_model.safetensors for LoRA, where PEFT drops the adapter name ".default").
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import torch
import trl
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM, TrainerCallback

PROMPTS = ["The cat sat on", "Two plus two is", "Once upon a time, in a land far away"]  # differing lengths
G = 4
MAX_COMPLETION_LENGTH = 12
STEPS = 3
RECORDED_AFTER = 2  # N: the recorded step is N + 1, between checkpoint-N and checkpoint-N+1
LEARNING_RATE = 1e-3  # large enough that an Adam step is not lost in float32 rounding of θ
WEIGHT_DECAY = 0.1  # so HF's two param groups (decay, no decay) differ
CLIPPED_MAX_GRAD_NORM = 1e-3  # below every gradient norm of these runs: clipping active
UNCLIPPED_MAX_GRAD_NORM = 1e6  # above every gradient norm: clipping inactive
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")

Finetuning = Literal["full", "lora"]


def completion_length_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """The reward of each completion: its token count (EOS included). Completion lengths vary, so groups
    have mixed rewards and non-zero advantages."""
    return [float(len(ids)) for ids in completion_ids]


@dataclass(frozen=True)
class TrlCase:
    finetuning: Finetuning
    loss_type: Literal["dapo", "grpo"]
    clipped: bool

    @property
    def max_grad_norm(self) -> float:
        return CLIPPED_MAX_GRAD_NORM if self.clipped else UNCLIPPED_MAX_GRAD_NORM

    def __str__(self) -> str:
        return f"{self.finetuning}-{self.loss_type}-{'clipped' if self.clipped else 'unclipped'}"


@dataclass
class RecordedStep:
    """Step N + 1 of a real GRPOTrainer run. N rows = len(PROMPTS) × G, in RepeatSampler order."""

    case: TrlCase
    checkpoint: Path  # checkpoint-N: the weights and optimizer state the step starts from
    next_checkpoint: Path  # checkpoint-N+1: the weights after it
    batch: dict[str, torch.Tensor]  # _generate_and_score_completions' output: prompt_ids, prompt_mask, ...
    prompts: list[str]  # [N] each row's prompt
    rewards: torch.Tensor  # [N] float32, completion_length_reward of each row
    gradient: dict[str, torch.Tensor]  # weights-file key -> p.grad at on_pre_optimizer_step (clipped)
    optimizer_groups: list[list[str]]  # AdamW's param groups, each as weights-file keys in the optimizer's order
    eos_token_ids: list[int]  # the ids that end a TRL completion
    args: trl.GRPOConfig


def weights_key(name: str) -> str:
    """A trainable parameter's key in the checkpoint's weights file (PEFT saves without the adapter name)."""
    return name.replace(".default.", ".")


class StepRecorder(TrainerCallback):
    """Keeps the gradient AdamW receives in step N + 1 and the optimizer's parameter order."""

    def __init__(self, recorded_after: int):
        self.recorded_after = recorded_after
        self.gradient: dict[str, torch.Tensor] = {}
        self.optimizer_groups: list[list[str]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != self.recorded_after:
            return
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.gradient = {weights_key(name): p.grad.detach().clone() for name, p in trainable}
        names = {id(p): weights_key(name) for name, p in trainable}
        self.optimizer_groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def base_model_folder(tokenizer, folder: Path) -> Path:
    """The tiny model before training, saved where a LoRA checkpoint's adapter_config.json will point."""
    tiny_llama(tokenizer, eos_scale=3.0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_grpo(case: TrlCase, base_folder: Path, tokenizer, output_dir: Path) -> RecordedStep:
    """STEPS steps of trl.GRPOTrainer from base_folder's model, recording step RECORDED_AFTER + 1."""
    torch.manual_seed(0)
    args = trl.GRPOConfig(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        per_device_train_batch_size=len(PROMPTS) * G,  # one generation batch = one microbatch = one step
        gradient_accumulation_steps=1,
        num_generations=G,
        max_completion_length=MAX_COMPLETION_LENGTH,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=1,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        loss_type=case.loss_type,
        max_grad_norm=case.max_grad_norm,
        seed=0,
    )
    recorder = StepRecorder(RECORDED_AFTER)
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_folder),
        reward_funcs=completion_length_reward,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        callbacks=[recorder],
        peft_config=LORA if case.finetuning == "lora" else None,
    )
    recorded = {}
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        output = generate_and_score(inputs)
        if trainer.state.global_step == RECORDED_AFTER:
            recorded["batch"] = {k: v.detach().clone() for k, v in output.items() if isinstance(v, torch.Tensor)}
            recorded["prompts"] = [row["prompt"] for row in inputs]
        return output

    trainer._generate_and_score_completions = recording
    trainer.train()
    batch = recorded["batch"]
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(batch["completion_ids"], batch["completion_mask"])]
    return RecordedStep(
        case=case,
        checkpoint=output_dir / f"checkpoint-{RECORDED_AFTER}",
        next_checkpoint=output_dir / f"checkpoint-{RECORDED_AFTER + 1}",
        batch=batch,
        prompts=recorded["prompts"],
        rewards=torch.tensor(completion_length_reward(completions)),  # the reward function, called again
        gradient=recorder.gradient,
        optimizer_groups=recorder.optimizer_groups,
        eos_token_ids=list(trainer.eos_token_ids),
        args=args,
    )


# ---- independent re-enactments of TRL's step ----


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """TRL's default (scale_rewards "group"): (r − group mean) / (group std with Bessel's correction + 1e-4)."""
    grouped = rewards.view(-1, G)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + STD_EPS)).flatten()


def load_model(checkpoint: Path, base_folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """checkpoint-N's model, every trainable parameter of the run requiring grad."""
    if (checkpoint / "adapter_config.json").is_file():
        base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=dtype)
        return PeftModel.from_pretrained(base, checkpoint, is_trainable=True).eval()
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()


def trl_gradient(step: RecordedStep, base_folder: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], float]:
    """The gradient of TRL's loss on step.batch at checkpoint-N, in `dtype`, after torch's clipping, and its
    norm before clipping.

    On-policy the importance ratio is exactly 1 and its ε-clipping is inactive, so the loss is
    −Σ A·mask·log π / N_tok (dapo, N_tok the batch's completion tokens) or the mean over completions of
    −Σ_t A·mask·log π / |y| (grpo); log π = log_softmax(logits), temperature 1; positions 0..T−1, as TRL
    passes no position_ids. Clipping: g · min(1, max_grad_norm / (‖g‖ + 1e-6)).
    """
    model = load_model(step.checkpoint, base_folder, dtype)
    batch = step.batch
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1 : -1]
    logprobs = logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    mask = batch["completion_mask"].to(dtype)
    weighted = group_advantages(step.rewards).to(dtype)[:, None] * mask * logprobs
    if step.case.loss_type == "dapo":
        loss = -weighted.sum() / mask.sum()
    else:
        loss = -(weighted.sum(1) / mask.sum(1).clamp(min=1)).mean()
    named = {weights_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    gradient = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradient.values()]))
    factor = min(1.0, step.case.max_grad_norm / (norm.item() + 1e-6))
    return {name: g * factor for name, g in gradient.items()}, norm.item()


def weights_file(checkpoint: Path) -> Path:
    lora = checkpoint / "adapter_model.safetensors"
    return lora if lora.is_file() else checkpoint / "model.safetensors"


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(weights_file(checkpoint))


def adamw_step(step: RecordedStep, gradient: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Δθ of torch.optim.AdamW's next step, in float64: float64 copies of checkpoint-N's parameters, its
    optimizer.pt loaded into an AdamW over them (param groups in the trainer's own order), `gradient` as p.grad."""
    weights = checkpoint_weights(step.checkpoint)
    names = [name for group in step.optimizer_groups for name in group]
    params = {name: weights[name].double().clone().requires_grad_() for name in names}
    saved = torch.load(step.checkpoint / "optimizer.pt", weights_only=True)
    optimizer = torch.optim.AdamW(
        [{"params": [params[name] for name in names]} for names in step.optimizer_groups], foreach=False
    )
    optimizer.load_state_dict(saved)  # the saved lr, betas, eps, weight decay and moments (cast to float64)
    for name, param in params.items():
        param.grad = gradient[name].double()
    before = {name: param.detach().clone() for name, param in params.items()}
    optimizer.step()
    return {name: param.detach() - before[name] for name, param in params.items()}
