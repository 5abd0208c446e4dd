import json
import os

import pytest

from torchtune_blah.tiny import TINY_VOCAB_SIZE, squad_sample_path, tiny_llama3_tokenizer, write_tiny_tiktoken

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    return write_tiny_tiktoken(str(tmp_path_factory.mktemp("tok") / "tiny_tiktoken.model"))


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_path):
    return tiny_llama3_tokenizer(tiny_tokenizer_path)


@pytest.fixture(scope="session")
def squad_path():
    return squad_sample_path()


@pytest.fixture(scope="session")
def squad_official(squad_path):
    with open(squad_path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def seed_prompts():
    with open(os.path.join(HERE, "data", "seed_prompts.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def append_spec():
    return {"num": 5, "mode": "append", "vocab_size": TINY_VOCAB_SIZE}
