"""A recipe the user owns: a `tune cp` copy takes keys of its own; the pause tokens have one owner;
the schema is the one place for defaults."""

import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import demo_cfg, fast_overrides

from torchtune_blah.config_schema import ConfigError

TUNE = shutil.which("tune") or os.path.join(os.path.dirname(sys.executable), "tune")


def test_leaving_phases_out_trains_both(tmp_path, tiny_base):
    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    cfg = demo_cfg(fast_overrides(tmp_path / "run", tiny_base))
    del cfg["phases"]
    recipe = BlahQLoRARecipe(cfg)
    assert recipe._phases == ["embed", "lora"]
    assert recipe.cfg.collate_fn == "torchtune.data.padded_collate_sft"  # a default read from the schema


def test_pause_tokens_of_the_data_and_of_the_model_cannot_differ(tmp_path, tiny_base):
    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    cfg = demo_cfg(fast_overrides(tmp_path / "run", tiny_base))
    cfg.dataset.pause_tokens = OmegaConf.create({**OmegaConf.to_container(cfg.pause_tokens, resolve=True), "num": 3})
    with pytest.raises(ConfigError, match=r"dataset.pause_tokens gives 3 pause token\(s\).* pause_tokens, which the "
                                          r"model's rows are made from, gives 5"):
        BlahQLoRARecipe(cfg)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written or loaded
    # left out of the dataset section, the recipe hands the data its own spec
    del cfg.dataset["pause_tokens"]
    recipe = BlahQLoRARecipe(cfg)
    recipe.setup(cfg)
    assert recipe._dataset.pause == recipe._pause
    recipe.cleanup()


@pytest.mark.slow
def test_a_tune_cp_copy_adds_a_key_and_runs(tmp_path, tiny_base):
    work = tmp_path / "mine"
    work.mkdir()

    def tune(*args):
        return subprocess.run([TUNE, *args], cwd=work, capture_output=True, text=True, timeout=600)

    assert tune("cp", "blah_qlora", "my_recipe.py").returncode == 0
    assert tune("cp", "demo_cpu_blah", "my_config.yaml").returncode == 0
    recipe = (work / "my_recipe.py").read_text()
    anchor = "class Config(QLoRAConfig):"
    docstring_end = recipe.index('"""', recipe.index('"""', recipe.index(anchor)) + 3) + 3
    recipe = recipe[:docstring_end] + "\n    my_new_flag: int = 0\n" + recipe[docstring_end:]
    loop = "        trainable = self._set_trainable(phase, train_pause)\n"
    assert loop in recipe
    recipe = recipe.replace(loop, loop + '        self._info(f"my_new_flag is {self.cfg.my_new_flag}")\n')
    (work / "my_recipe.py").write_text(recipe)
    with open(work / "my_config.yaml", "a") as f:
        f.write("my_new_flag: 7\n")
    overrides = fast_overrides(tmp_path / "run", tiny_base, **{"embed.max_steps": 2, "lora.max_steps": 2,
                                                               "embed.save_every_n_steps": "null",
                                                               "lora.save_every_n_steps": "null", "validation": "null"})
    done = tune("run", "my_recipe.py", "--config", "my_config.yaml", *overrides)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "my_new_flag is 7" in done.stdout + done.stderr
    assert os.path.isfile(tmp_path / "run" / "lora" / "phase_complete.json")
    # a misspelt key is still refused, naming the nearest one
    typo = tune("run", "my_recipe.py", "--config", "my_config.yaml", *overrides, "my_new_flg=1")
    assert typo.returncode != 0 and "did you mean my_new_flag" in typo.stdout + typo.stderr


def test_single_device_and_fsdp2_each_implement_the_whole_protocol():
    from torchtune_blah.parallel import FSDP2, Parallel, SingleDevice

    wanted = [n for n, v in vars(Parallel).items() if not n.startswith("_") and callable(v)]
    assert "place" in wanted and "all_reduce" in wanted
    for cls in (SingleDevice, FSDP2):
        assert cls.__mro__[1:] == (object,), cls  # side by side, no implementation inheritance
        assert [n for n in wanted if n not in vars(cls)] == [], cls
