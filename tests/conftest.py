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


REPO = os.path.dirname(HERE)
DEMO_CONFIG = os.path.join(REPO, "configs", "demo_cpu_blah.yaml")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_tokenizer_path):
    """The demo's tiny base model and tokenizer, made once per test session."""
    from torchtune_blah.tiny import write_tiny_hf_checkpoint

    base = tmp_path_factory.mktemp("tiny_base")
    write_tiny_hf_checkpoint(str(base))
    return {"checkpoint_dir": str(base), "tokenizer": tiny_tokenizer_path}


def fast_overrides(output_dir, tiny_base, **extra):
    """CLI-style overrides that make the demo config a seconds-long test run."""
    overrides = {
        "output_dir": str(output_dir),
        "tokenizer.path": tiny_base["tokenizer"],
        "tokenizer.max_seq_len": 512,
        "checkpointer.checkpoint_dir": tiny_base["checkpoint_dir"],
        "embed.max_steps": 6, "embed.batch_size": 2, "embed.save_every_n_steps": 2,
        "lora.max_steps": 6, "lora.batch_size": 2, "lora.save_every_n_steps": 2,
        "log_every_n_steps": 1,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def demo_cfg(overrides):
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.load(DEMO_CONFIG), OmegaConf.from_dotlist(overrides))


def read_disk_log(log_dir):
    """{metric: [values by step]} from torchtune's DiskLogger files in log_dir."""
    metrics = {}
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                if not line.startswith("Step "):
                    continue
                for item in line.split("|", 1)[1].split():
                    key, value = item.rsplit(":", 1)
                    metrics.setdefault(key, []).append(float(value))
    return metrics


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_base):
    """A demo run trained long enough to write the JSON block and stop at its "}"."""
    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = demo_cfg(fast_overrides(out, tiny_base, **{
        "embed.max_steps": 10, "embed.batch_size": 4, "lora.max_steps": 120, "lora.epochs": 8, "lora.batch_size": 4,
        "embed.save_every_n_steps": "null", "lora.save_every_n_steps": "null", "model.lora_dropout": 0.0}))
    recipe = BlahQLoRARecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    return str(out)


@pytest.fixture(scope="module")
def loaded(trained_run):
    """(model, pause tokens, tokenizer) of the trained demo run's lora stage, fp32."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config

    from torchtune_blah.model import load_run_model

    run_cfg = OmegaConf.load(os.path.join(trained_run, "blah_config.yaml"))
    tokenizer = config.instantiate(run_cfg.tokenizer)
    model, pause = load_run_model(run_cfg, trained_run, "lora", torch.device("cpu"), torch.float32,
                                  staging_dir=os.path.join(trained_run, ".stage_test"))
    return model, pause, tokenizer
