"""Every shipped config resolves: components import, phases check, optimizers build."""

import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config
from torchtune.config._utils import _get_component_from_path
from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS

from torchtune_blah._registry import RECIPES
from torchtune_blah.pause import as_pause_tokens
from torchtune_blah.recipe_config import check_phases

from conftest import REPO

CONFIGS = [(name, os.path.join(REPO, "configs", f)) for entry in RECIPES for name, f in entry.configs]
TRAIN_CONFIGS = [(n, p) for entry in RECIPES if entry.name in ("blah_qlora", "blah_qlora_distributed")
                 for n, p in CONFIGS if n in dict(entry.configs)]
DISTRIBUTED_CONFIGS = [n for entry in RECIPES if entry.name == "blah_qlora_distributed" for n, _ in entry.configs]
# blah_export / blah_generate: the config has its recipe's name, which `tune cp` resolves to the recipe
RECIPE_NAMES = {entry.name for entry in RECIPES}
EVAL_CONFIGS = [(n, os.path.join(REPO, "configs", f)) for entry in RECIPES if entry.name == "blah_eval"
                for n, f in entry.configs]


# Rows of each family's token-embedding table (config.json's vocab_size).
EMBEDDING_ROWS = {"llama3": 128256, "smollm2": 49152, "qwen2_5": 151936, "demo_cpu": 1056}


class _Llama3SpecialTokens:
    special_tokens = LLAMA3_SPECIAL_TOKENS


def _components(node, path=""):
    if isinstance(node, dict):
        if "_component_" in node:
            yield path, node
        for key, value in node.items():
            yield from _components(value, f"{path}.{key}" if path else key)


@pytest.mark.parametrize("name, path", TRAIN_CONFIGS, ids=[c[0] for c in TRAIN_CONFIGS])
def test_training_config_resolves(name, path):
    cfg = OmegaConf.load(path)
    plain = OmegaConf.to_container(cfg, resolve=True)
    phases = check_phases(cfg)
    for where, node in _components(plain):
        target = _get_component_from_path(node["_component_"])
        kwargs = {k: v for k, v in node.items() if k != "_component_"}
        if where == "model":  # building an 8B model here is too much; the keys must fit its builder
            inspect.signature(target).bind(**kwargs)
    pause = as_pause_tokens(plain["pause_tokens"], _Llama3SpecialTokens())
    assert pause.num == 5 and len(pause.ids) == 5
    if pause.mode == "append":  # the first id past the model's embedding table
        family = next(f for f in EMBEDDING_ROWS if name.startswith(f))
        assert pause.ids[0] == EMBEDDING_ROWS[family]
    else:
        assert all(128000 <= i < 128256 for i in pause.ids)
    param = torch.nn.Parameter(torch.zeros(4, 4))
    for phase in phases:
        optimizer = tt_config.instantiate(cfg[phase].optimizer, [param])
        tt_config.instantiate(cfg[phase].lr_scheduler, optimizer, num_training_steps=100, last_epoch=-1)
    assert cfg.dataset.pause_tokens == cfg.pause_tokens
    if name in DISTRIBUTED_CONFIGS:  # what blah_qlora_distributed reads, and llama-squad's batch of 16 over its GPUs
        gpus = int(re.search(r"--nproc_per_node (\d+) blah_qlora_distributed", open(path).read()).group(1))
        assert cfg.enable_activation_checkpointing
        assert isinstance(cfg.fsdp_cpu_offload, bool) and isinstance(cfg.fsdp_reshard_after_forward, bool)
        for phase in phases:
            assert gpus * cfg[phase].batch_size * cfg[phase].gradient_accumulation_steps == 16, phase


@pytest.mark.parametrize("name, path", EVAL_CONFIGS, ids=[c[0] for c in EVAL_CONFIGS])
def test_eval_config_keys(name, path):
    cfg = OmegaConf.load(path)
    assert cfg.stage in ("base", "embed", "lora", "latest") and cfg.batch_size >= 1
    assert {"source", "max_examples", "shuffle_seed"} <= set(cfg.dataset)


def test_export_and_generate_configs_name_every_key_their_recipes_read():
    export = OmegaConf.load(os.path.join(REPO, "configs", "blah_export.yaml"))
    assert set(export) == {"run_dir", "stage", "output_dir", "format", "dtype", "eval_dirs"}
    assert OmegaConf.is_missing(export, "run_dir") and OmegaConf.is_missing(export, "output_dir")
    generate = OmegaConf.load(os.path.join(REPO, "configs", "blah_generate.yaml"))
    source = open(os.path.join(REPO, "recipes", "blah_generate.py")).read()
    read = set(re.findall(r"(?<![\w.])(?:self\._)?cfg\.(?:get\(\")?(\w+)", source))  # cfg.x, cfg.get("x")
    assert read and read <= set(generate), read - set(generate)


def test_tune_cp_copies_our_recipe_and_configs(tmp_path):
    pairs = [("blah_qlora", "r.py", os.path.join(REPO, "recipes", "blah_qlora.py")),
             ("blah_qlora_distributed", "d.py", os.path.join(REPO, "recipes", "blah_qlora_distributed.py")),
             ("blah_eval", "e.py", os.path.join(REPO, "recipes", "blah_eval.py")),
             ("blah_export", "x.py", os.path.join(REPO, "recipes", "blah_export.py")),
             ("blah_generate", "g.py", os.path.join(REPO, "recipes", "blah_generate.py"))] + [
        (n, f"{n}.yaml", p) for n, p in CONFIGS if n not in RECIPE_NAMES]
    # The first through the `tune` executable; the rest through the same CLI parser in one fresh
    # process (a `tune` start-up costs seconds; the start-up hook is the same).
    result = subprocess.run([shutil.which("tune"), "cp", pairs[0][0], pairs[0][1]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    script = ("import sys\nfrom torchtune._cli.tune import TuneCLIParser\n"
              "for name, target in zip(sys.argv[1::2], sys.argv[2::2]):\n"
              "    cli = TuneCLIParser()\n    cli.run(cli._parser.parse_args(['cp', name, target]))\n")
    result = subprocess.run([sys.executable, "-c", script, *[x for n, t, _ in pairs[1:] for x in (n, t)]],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name, target, source in pairs:
        with open(source) as f:
            assert (tmp_path / target).read_text() == f.read(), name
