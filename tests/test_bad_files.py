"""Bad files stop the probe with the same one-line errors as bad settings, naming the file.

Each damaged file is a real one, written by the library that writes it in practice (json, torch.save of a
real AdamW state, HF Trainer, PEFT, Lightning), then truncated to its first half or overwritten with garbage.
"""

import argparse
import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_llama
from torch import nn
from transformers import Trainer, TrainingArguments

import train
from probe_lightning.checkpoints import load_checkpoint
from probe_lightning.config import ProbeConfigError
from probe_lightning.models import load_model_and_tokenizer
from probe_lightning.optimizer_state import load_optimizer_state
from probe_lightning.problems import load_problems

ROOT = Path(__file__).parents[1]
GOOD_LINE = json.dumps({"question": "What is 2 + 2?", "answer": "4"})
MISSING_ZIP_DIRECTORY = "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory"
CHECKPOINT_FIX = "re-save the checkpoint or point model.checkpoint at another one"


def truncate(path: Path) -> Path:
    """Keep the first half of the file's bytes, as an interrupted copy or save leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def overwrite_start(path: Path) -> Path:
    """Overwrite the first 64 bytes with garbage (damage in tensor data alone goes unseen by torch.load)."""
    data = path.read_bytes()
    path.write_bytes(b"garbage!" * 8 + data[64:])
    return path


def jsonl(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ---- JSONL ----


def test_a_jsonl_line_that_is_not_json_is_named_by_its_number(tmp_path):
    path = jsonl(tmp_path, GOOD_LINE, "", '{"question": "What is 3 + 3?" "answer": "6"}')

    with pytest.raises(ProbeConfigError) as error:
        load_problems("jsonl", path)

    assert str(error.value) == (
        f"data.path {path!r} line 3 is not valid JSON (Expecting ',' delimiter: column 31): fix or remove that line"
    )


def test_a_jsonl_line_that_is_not_an_object_is_named_by_its_number(tmp_path):
    path = jsonl(tmp_path, GOOD_LINE, '["What is 3 + 3?", "6"]')

    with pytest.raises(ProbeConfigError, match=r"line 2 is a JSON list, not an object: write one \{\"question\""):
        load_problems("jsonl", path)


def test_a_jsonl_line_that_is_not_utf8_is_named_by_its_number(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b'\n{"question": "Caf\xe9?", "answer": "1"}\n')

    with pytest.raises(ProbeConfigError, match=r"line 2 is not UTF-8 text \(invalid continuation byte at byte 17\)"):
        load_problems("jsonl", str(path))


def test_a_jsonl_file_of_blank_lines_is_refused(tmp_path):
    path = jsonl(tmp_path, "", "  ")

    with pytest.raises(ProbeConfigError, match=r"problems.jsonl' holds no JSON lines: write one"):
        load_problems("jsonl", path)


def test_blank_lines_between_jsonl_objects_are_skipped(tmp_path):
    path = jsonl(tmp_path, GOOD_LINE, "", GOOD_LINE)

    assert [problem.answer for problem in load_problems("jsonl", path)] == ["4", "4"]


def test_a_bad_jsonl_line_stops_the_cli_with_a_one_line_error_before_the_model_loads(tmp_path):
    """The DataModule reads the file in setup(), before configure_model(): the model path is never opened."""
    path = jsonl(tmp_path, GOOD_LINE, "{not json}")
    args = [
        "predict", "--config", str(ROOT / "configs/sp.yaml"), "--model.model", str(tmp_path / "never-loaded"),
        "--data.source", "jsonl", "--data.path", path, "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip

    with pytest.raises(SystemExit) as exit_info:
        train.main(args)

    text = str(exit_info.value.code)
    assert text == (
        f"error: data.path {path!r} line 2 is not valid JSON "
        "(Expecting property name enclosed in double quotes: column 2): fix or remove that line"
    )


# ---- a bare optimizer-state file ----


@pytest.fixture
def adamw_state_file(tmp_path) -> tuple[Path, list]:
    """torch.save of a real AdamW state_dict after one step on a tiny model, and the model's parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    return path, list(model.named_parameters())


def test_a_truncated_optimizer_state_file_is_named_as_truncated_or_corrupt(adamw_state_file):
    path, named_params = adamw_state_file
    assert len(load_optimizer_state(str(path), named_params).adam_states) == 4  # the intact file loads

    with pytest.raises(ProbeConfigError) as error:
        load_optimizer_state(str(truncate(path)), named_params).adam_states

    assert str(error.value) == (
        f"optimizer_state {str(path)!r} is truncated or corrupt: torch.load fails ({MISSING_ZIP_DIRECTORY}): "
        "save it again with torch.save(optimizer.state_dict(), path) or point model.optimizer_state at another file"
    )


def test_an_optimizer_state_file_with_garbage_bytes_is_named_as_truncated_or_corrupt(adamw_state_file):
    path, named_params = adamw_state_file

    with pytest.raises(ProbeConfigError) as error:
        load_optimizer_state(str(overwrite_start(path)), named_params).adam_states

    assert str(error.value).startswith(
        f"optimizer_state {str(path)!r} is truncated or corrupt: "
        "torch.load fails (UnpicklingError: Unsupported operand 103): save it again"
    )


# ---- an HF Trainer checkpoint folder ----


@pytest.fixture(scope="module")
def hf_checkpoint(tokenizer, tmp_path_factory) -> Path:
    """checkpoint-1/ of a real one-step HF Trainer run of the tiny Llama: model.safetensors, optimizer.pt, ..."""
    output_dir = tmp_path_factory.mktemp("hf")
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=1,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    Trainer(model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer).train()
    return output_dir / "checkpoint-1"


@pytest.fixture
def hf_copy(hf_checkpoint, tmp_path) -> Path:
    """A copy of the checkpoint to damage."""
    return Path(shutil.copytree(hf_checkpoint, tmp_path / "checkpoint-1"))


def test_a_truncated_optimizer_pt_in_an_hf_checkpoint_is_named(hf_copy):
    truncate(hf_copy / "optimizer.pt")

    with pytest.raises(ProbeConfigError) as error:
        load_checkpoint(str(hf_copy))

    assert str(error.value) == (
        f"checkpoint {str(hf_copy)!r} optimizer.pt is truncated or corrupt: torch.load fails "
        f"({MISSING_ZIP_DIRECTORY}): {CHECKPOINT_FIX}"
    )


def test_a_truncated_model_safetensors_in_an_hf_checkpoint_is_named(hf_copy):
    truncate(hf_copy / "model.safetensors")

    with pytest.raises(ProbeConfigError) as error:
        load_checkpoint(str(hf_copy))

    assert str(error.value) == (
        f"checkpoint {str(hf_copy)!r} model.safetensors is truncated or corrupt (SafetensorError: Error while "
        f"deserializing header: incomplete metadata, file not fully covered): {CHECKPOINT_FIX}"
    )


def test_a_model_safetensors_with_garbage_bytes_in_an_hf_checkpoint_is_named(hf_copy):
    overwrite_start(hf_copy / "model.safetensors")

    with pytest.raises(ProbeConfigError) as error:
        load_checkpoint(str(hf_copy))

    assert str(error.value) == (
        f"checkpoint {str(hf_copy)!r} model.safetensors is truncated or corrupt "
        f"(SafetensorError: Error while deserializing header: header too large): {CHECKPOINT_FIX}"
    )


def test_a_truncated_trainer_state_json_in_an_hf_checkpoint_is_named(hf_copy):
    truncate(hf_copy / "trainer_state.json")

    with pytest.raises(ProbeConfigError) as error:
        load_checkpoint(str(hf_copy))

    message = str(error.value)  # the line and column depend on the run's timings, which trainer_state.json holds
    assert message.startswith(f"checkpoint {str(hf_copy)!r} trainer_state.json is truncated or corrupt, not valid JSON")
    assert message.endswith(CHECKPOINT_FIX)


def test_a_truncated_model_safetensors_in_a_model_folder_is_named(hf_copy):
    truncate(hf_copy / "model.safetensors")

    with pytest.raises(ProbeConfigError) as error:
        load_model_and_tokenizer(str(hf_copy))

    assert str(error.value) == (
        f"model {str(hf_copy)!r} model.safetensors is truncated or corrupt (SafetensorError: Error while "
        "deserializing header: incomplete metadata, file not fully covered): save or copy the model again, "
        "or point model.model at another one"
    )


# ---- a PEFT adapter folder ----


def test_a_truncated_adapter_model_safetensors_is_named(tokenizer, tmp_path):
    base = tmp_path / "base"
    tiny_llama(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    adapter = tmp_path / "adapter"
    get_peft_model(tiny_llama(tokenizer), config).save_pretrained(adapter)
    truncate(adapter / "adapter_model.safetensors")

    with pytest.raises(ProbeConfigError) as error:
        load_checkpoint(str(adapter), base_model=str(base), require_optimizer_state=False)

    assert str(error.value) == (
        f"checkpoint {str(adapter)!r} adapter_model.safetensors is truncated or corrupt (SafetensorError: Error "
        f"while deserializing header: incomplete metadata, file not fully covered): {CHECKPOINT_FIX}"
    )


# ---- a Lightning .ckpt ----


class LinearModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.fixture
def lightning_ckpt(tmp_path) -> Path:
    """trainer.save_checkpoint after one real training step."""
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LinearModule(), torch.utils.data.DataLoader(torch.ones(2, 4), batch_size=2))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_a_truncated_lightning_ckpt_is_named(lightning_ckpt):
    assert "optimizer_states" in torch.load(lightning_ckpt, weights_only=True)  # the intact file loads

    with pytest.raises(ProbeConfigError) as error:
        load_checkpoint(str(truncate(lightning_ckpt)))

    assert str(error.value) == (
        f"checkpoint {str(lightning_ckpt)!r} is truncated or corrupt: torch.load fails ({MISSING_ZIP_DIRECTORY}): "
        f"{CHECKPOINT_FIX}"
    )


def test_a_lightning_ckpt_with_garbage_bytes_is_named(lightning_ckpt):
    with pytest.raises(ProbeConfigError) as error:
        load_checkpoint(str(overwrite_start(lightning_ckpt)))

    assert str(error.value) == (
        f"checkpoint {str(lightning_ckpt)!r} is truncated or corrupt: torch.load fails "
        f"(UnpicklingError: Unsupported operand 103): {CHECKPOINT_FIX}"
    )


def test_a_ckpt_holding_pickled_python_objects_is_refused_with_the_global_named(tmp_path):
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"args": argparse.Namespace(lr=1e-3)}}, path)

    with pytest.raises(ProbeConfigError) as error:
        load_checkpoint(str(path))

    assert str(error.value) == (
        f"checkpoint {str(path)!r}: torch.load(weights_only=True) refused it (UnpicklingError: Unsupported global: "
        "GLOBAL argparse.Namespace was not an allowed global by default): it holds pickled Python objects "
        "(e.g. a Lightning checkpoint's hyper_parameters); save it without them"
    )
