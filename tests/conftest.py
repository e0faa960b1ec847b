import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py

from probe_lightning.models import DEFAULT_MODEL, load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's real tokenizer (pad == eos == <|im_end|>), left padding."""
    return load_tokenizer(DEFAULT_MODEL)
