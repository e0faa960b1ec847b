import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules: tiny_models, enumerable_world, probe_helpers

from enumerable_world import PROMPTS, save_world  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

from probe_lightning.models import DEFAULT_MODEL, load_tokenizer  # noqa: E402

GSM8K = Path(__file__).parent / "data" / "gsm8k_test.jsonl"


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's real tokenizer (pad == eos == <|im_end|>), left padding."""
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def base_folder(tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama (tiny_models.tiny_llama) before any training, saved as a model folder: the base model of
    the tests' fine-tuning runs and TRL's reference model (beta > 0)."""
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> str:
    """The enumerable world (tests/enumerable_world.py) saved as a model folder."""
    return save_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> str:
    """The enumerable world's prompts, ten times over, as a question/answer JSONL file."""
    path = tmp_path_factory.mktemp("data") / "digits.jsonl"
    path.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in PROMPTS * 10))
    return str(path)


@pytest.fixture(scope="session")
def gsm8k_path() -> Path:
    """The real GSM8K test set, shipped with the tests (tests/data/README.md: source and MIT licence)."""
    return GSM8K


@pytest.fixture
def one_thread():
    """Tiny tensors: thread hand-offs cost more than they save, badly so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
