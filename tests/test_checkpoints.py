"""Real checkpoints written by HF Trainer (full and LoRA) and Lightning, read back by load_checkpoint.

Each training run records the optimizer step that follows its checkpoint (parameters before and after,
the gradient AdamW saw, AdamW's state), so the loaded state and adamw_step are checked against what
the trainer itself held and did.
"""

import json
import logging
import shutil

import lightning.pytorch as pl
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from probe_lightning.checkpoints import hf_trainer_layout, load_checkpoint, trainable_parameters
from probe_lightning.config import ProbeConfigError
from probe_lightning.optimizer_state import load_optimizer_state, resolve_learning_rate
from probe_lightning.preconditioning import adam_states_from_state_dict, adamw_step, sequential_layout

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1


def token_batches(count: int = 12, length: int = 8) -> torch.Tensor:
    return torch.randint(0, 1000, (count, length), generator=torch.Generator().manual_seed(0))


class StepRecorder(TrainerCallback):
    """Records the optimizer step taken after `finished_steps` steps, i.e. the one after checkpoint-N."""

    def __init__(self, finished_steps: int):
        self.finished_steps = finished_steps

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.finished_steps:
            params = trainable_parameters(model)
            self.before = {n: p.detach().clone() for n, p in params}
            self.grad = {n: p.grad.detach().clone() for n, p in params}  # after clipping: what AdamW sees
            self.adam = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in params}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.finished_steps:
            self.after = {n: p.detach().clone() for n, p in trainable_parameters(model)}


def hf_train(model, output_dir, **trainer_kwargs) -> tuple[Trainer, StepRecorder]:
    """3 steps with a linear schedule, checkpoints at steps 2 and 3; records step 3."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=3,
        save_steps=2,
        save_strategy="steps",
        per_device_train_batch_size=2,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    dataset = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)} for ids in token_batches()]
    recorder = StepRecorder(finished_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder], **trainer_kwargs)
    trainer.train()
    return trainer, recorder


@pytest.fixture(scope="module")
def hf_full(tokenizer, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("hf_full")
    trainer, recorder = hf_train(tiny_llama(tokenizer), output_dir, processing_class=tokenizer)
    return trainer, recorder, output_dir


@pytest.fixture(scope="module")
def hf_lora(base_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("hf_lora")
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer, recorder = hf_train(get_peft_model(base, config), output_dir)
    return trainer, recorder, output_dir


def assert_states_are_the_trainers(states, recorder):
    assert [s.name for s in states] == list(recorder.adam)
    for state in states:
        saved = recorder.adam[state.name]
        assert torch.equal(state.exp_avg, saved["exp_avg"]), state.name
        assert torch.equal(state.exp_avg_sq, saved["exp_avg_sq"]), state.name
        assert state.step == float(saved["step"]) == 2.0


def assert_step_is_the_trainers(loaded, recorder):
    """adamw_step on the checkpoint with ∇J = −(the trainer's gradient) gives the trainer's Δθ."""
    names, params = zip(*trainable_parameters(loaded.model))
    ascent = [-recorder.grad[n] for n in names]

    delta = adamw_step(loaded.optimizer.adam_states, list(params), ascent)

    for name, d in zip(names, delta):
        before = recorder.before[name]
        real = recorder.after[name] - before
        # float32 θ_new − θ is exact only to ~1 ulp of θ (2 roundings in torch's step); Δθ itself is ~1e-4.
        ulp = torch.nextafter(before.abs(), torch.tensor(float("inf"))) - before.abs()
        excess = (d - real).abs() - (2 * ulp + 1e-5 * real.abs())
        assert excess.max() <= 0, f"{name}: |Δθ − real| exceeds 2 ulp(θ) + 1e-5 |real| by {excess.max():.3g}"


# ---- HF Trainer, full fine-tuning ----


def test_hf_trainer_layout_is_the_trainers_own_grouping(hf_full):
    trainer, _, _ = hf_full
    layout = hf_trainer_layout(trainer.model)

    groups = [[id(p) for p in group["params"]] for group in trainer.optimizer.param_groups]
    assert groups == [[id(p) for _, p in group] for group in layout]
    assert [n for n, _ in layout[1]] == [n for n, _ in trainer.model.named_parameters() if "norm" in n]


def test_hf_full_checkpoint_loads_the_trained_model_and_tokenizer(hf_full, tokenizer):
    _, recorder, output_dir = hf_full

    loaded = load_checkpoint(str(output_dir / "checkpoint-2"))

    assert loaded.format == "hf_full"
    assert loaded.global_step == 2
    for name, param in trainable_parameters(loaded.model):
        assert torch.equal(param, recorder.before[name]), name
    assert loaded.tokenizer("a b c").input_ids == tokenizer("a b c").input_ids


def test_hf_full_adam_states_are_the_trainers_optimizer_state(hf_full):
    _, recorder, output_dir = hf_full

    loaded = load_checkpoint(str(output_dir / "checkpoint-2"))

    assert_states_are_the_trainers(loaded.optimizer.adam_states, recorder)
    assert {s.name for s in loaded.optimizer.adam_states if s.weight_decay == 0.0} == {n for n in recorder.adam if "norm" in n}
    assert {s.weight_decay for s in loaded.optimizer.adam_states if "norm" not in s.name} == {WEIGHT_DECAY}


def test_hf_full_learning_rate_is_the_next_steps(hf_full):
    """Linear decay over 3 steps: checkpoint-2's groups hold step 3's rate, η (1 − 2/3)."""
    _, _, output_dir = hf_full

    loaded = load_checkpoint(str(output_dir / "checkpoint-2"))

    assert loaded.optimizer.learning_rate == pytest.approx(LEARNING_RATE / 3, rel=1e-12)
    assert "optimizer.pt param groups" in loaded.optimizer.learning_rate_source
    assert {s.lr for s in loaded.optimizer.adam_states} == {loaded.optimizer.learning_rate}


def test_hf_full_adamw_step_reproduces_the_trainers_next_step(hf_full):
    _, recorder, output_dir = hf_full

    loaded = load_checkpoint(str(output_dir / "checkpoint-2"))

    assert_step_is_the_trainers(loaded, recorder)


def test_model_order_misreads_an_hf_full_optimizer(hf_full):
    """The plain optimizer_state path assumes model order: HF's regrouping breaks it at the first norm."""
    _, _, output_dir = hf_full
    model = load_checkpoint(str(output_dir / "checkpoint-2")).model

    message = r"entry 8 has shape \(32, 32\), parameter model.layers.0.input_layernorm.weight has shape \(32,\)"
    with pytest.raises(ProbeConfigError, match=message):
        load_optimizer_state(str(output_dir / "checkpoint-2" / "optimizer.pt"), trainable_parameters(model))


def test_last_checkpoint_of_a_linear_schedule_warns_that_the_learning_rate_is_zero(hf_full, caplog):
    _, _, output_dir = hf_full

    loaded = load_checkpoint(str(output_dir / "checkpoint-3"))
    with caplog.at_level(logging.WARNING, logger="probe_lightning.optimizer_state"):
        learning_rate, source = resolve_learning_rate(None, loaded.optimizer)

    assert loaded.optimizer.learning_rate == learning_rate == 0.0 and "optimizer.pt param groups" in source
    assert caplog.text.count("η = 0") == 1


def test_trainer_output_dir_names_its_checkpoints(hf_full):
    _, _, output_dir = hf_full

    with pytest.raises(ProbeConfigError, match=r"pass one of its checkpoints \['checkpoint-2', 'checkpoint-3'\]"):
        load_checkpoint(str(output_dir))


# ---- HF Trainer, LoRA ----


def test_hf_lora_checkpoint_loads_the_adapter_over_its_base(hf_lora, base_folder, tokenizer):
    trainer, recorder, output_dir = hf_lora
    checkpoint = output_dir / "checkpoint-2"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_folder)
    assert not (checkpoint / "tokenizer.json").exists()

    loaded = load_checkpoint(str(checkpoint))

    assert loaded.format == "hf_lora"
    assert isinstance(loaded.model, PeftModel)
    names = [n for n, _ in trainable_parameters(loaded.model)]
    assert names == list(recorder.adam) and all(".lora_" in n for n in names) and len(names) == 8
    for name, param in trainable_parameters(loaded.model):
        assert torch.equal(param, recorder.before[name]), name
    assert loaded.tokenizer("a b c").input_ids == tokenizer("a b c").input_ids


def test_hf_lora_adam_states_and_step_are_the_trainers(hf_lora):
    trainer, recorder, output_dir = hf_lora
    assert hf_trainer_layout(trainer.model)[1] == []  # LoRA: one decay group in model order

    loaded = load_checkpoint(str(output_dir / "checkpoint-2"))

    assert_states_are_the_trainers(loaded.optimizer.adam_states, recorder)
    assert loaded.optimizer.learning_rate == pytest.approx(LEARNING_RATE / 3, rel=1e-12)
    assert_step_is_the_trainers(loaded, recorder)


def test_explicit_base_model_replaces_a_missing_adapter_base(hf_lora, base_folder, tmp_path):
    _, recorder, output_dir = hf_lora
    moved = tmp_path / "checkpoint-2"
    shutil.copytree(output_dir / "checkpoint-2", moved)
    adapter_config = json.loads((moved / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "gone")  # trained on another machine
    (moved / "adapter_config.json").write_text(json.dumps(adapter_config))

    with pytest.raises(ProbeConfigError, match="cannot load base model"):
        load_checkpoint(str(moved))
    loaded = load_checkpoint(str(moved), base_model=str(base_folder))

    assert_states_are_the_trainers(loaded.optimizer.adam_states, recorder)


# ---- Lightning ----


class CausalLMModule(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        halve_each_step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": halve_each_step, "interval": "step"}}


@pytest.fixture(scope="module")
def lightning_run(base_folder, tmp_path_factory):
    """2 steps, trainer.save_checkpoint, then one more real optimizer step recorded by hand."""
    module = CausalLMModule(AutoModelForCausalLM.from_pretrained(base_folder).train())
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batches = token_batches()
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=2))
    path = tmp_path_factory.mktemp("lightning") / "tiny.ckpt"
    trainer.save_checkpoint(path)

    optimizer = trainer.optimizers[0]
    params = trainable_parameters(module.model)
    recorder = StepRecorder(finished_steps=2)
    recorder.adam = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in params}
    recorder.before = {n: p.detach().clone() for n, p in params}
    module.model(input_ids=batches[:2], labels=batches[:2]).loss.backward()
    recorder.grad = {n: p.grad.detach().clone() for n, p in params}
    optimizer.step()
    recorder.after = {n: p.detach().clone() for n, p in params}
    return path, recorder


def test_lightning_checkpoint_loads_weights_state_and_learning_rate(lightning_run, base_folder):
    """The lr halves after every step: the saved groups hold step 3's rate, η / 4."""
    path, recorder = lightning_run

    loaded = load_checkpoint(str(path), base_model=str(base_folder))

    assert (loaded.format, loaded.global_step, loaded.optimizer.learning_rate) == ("lightning", 2, LEARNING_RATE / 4)
    for name, param in trainable_parameters(loaded.model):
        assert torch.equal(param, recorder.before[name]), name
    assert_states_are_the_trainers(loaded.optimizer.adam_states, recorder)


def test_lightning_adamw_step_reproduces_the_next_optimizer_step(lightning_run, base_folder):
    path, recorder = lightning_run

    loaded = load_checkpoint(str(path), base_model=str(base_folder))

    assert_step_is_the_trainers(loaded, recorder)


def test_lightning_checkpoint_needs_a_base_model(lightning_run):
    path, _ = lightning_run

    with pytest.raises(ProbeConfigError, match="pass base_model"):
        load_checkpoint(str(path))


def test_lightning_checkpoint_for_another_architecture_names_the_first_mismatch(lightning_run, tokenizer, tmp_path):
    path, _ = lightning_run
    tiny_llama(tokenizer, hidden_size=16).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    vocab = len(tokenizer)
    message = rf"model.embed_tokens.weight: copying a param with shape torch.Size\(\[{vocab}, 32\]\).*\[{vocab}, 16\]"
    with pytest.raises(ProbeConfigError, match=message):
        load_checkpoint(str(path), base_model=str(tmp_path))


# ---- no optimizer state, ambiguity ----


def test_checkpoint_without_optimizer_state_needs_the_identity_update(base_folder):
    with pytest.raises(ProbeConfigError, match=r"has no optimizer.pt .*set model.update: identity"):
        load_checkpoint(str(base_folder))

    loaded = load_checkpoint(str(base_folder), require_optimizer_state=False)

    assert (loaded.format, loaded.optimizer.adam_states, loaded.optimizer.learning_rate) == ("hf_full", None, None)


def test_two_fitting_orders_that_disagree_are_an_error():
    """Equal shapes everywhere: HF's grouping and model order both fit, so the order is unknowable."""
    torch.manual_seed(0)
    model = nn.ModuleDict({name: nn.Linear(4, 4, bias=False) for name in ("a", "norm", "c")})
    decay, no_decay = hf_trainer_layout(model)
    optimizer = torch.optim.AdamW([{"params": [p for _, p in decay]}, {"params": [p for _, p in no_decay]}])
    sum(layer(torch.ones(4)).sum() for layer in model.values()).backward()
    optimizer.step()
    state_dict = optimizer.state_dict()
    named = trainable_parameters(model)
    layouts = {"HF Trainer groups": [decay, no_decay], "model order": sequential_layout(named, state_dict)}

    with pytest.raises(ProbeConfigError, match="ambiguous parameter order: .* put c.weight and norm.weight at entry 1"):
        adam_states_from_state_dict(state_dict, named, layouts=layouts)
