"""The tune CLI sees our recipes: tested for real, through the installed `tune` executable.

The start-up hook (torchtune_blah.pth -> torchtune_blah._tune_hook) adds every
entry of torchtune_blah._registry.RECIPES whose file exists. Here a throw-away
recipe is added to that table by a sitecustomize module on PYTHONPATH, and the
real `tune ls / cp / run` must find it, from an unrelated directory.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

import torchtune_blah._registry as registry

TUNE = shutil.which("tune") or os.path.join(os.path.dirname(sys.executable), "tune")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RECIPE = '''\
import sys
from omegaconf import DictConfig
from torchtune import config


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    print(f"tiny recipe ran: greeting={cfg.greeting} steps={cfg.steps}")


if __name__ == "__main__":
    sys.exit(recipe_main())
'''


@pytest.fixture
def tiny_registration(tmp_path):
    (tmp_path / "tiny_blah_recipe.py").write_text(TINY_RECIPE)
    (tmp_path / "tiny_blah.yaml").write_text("greeting: hello\nsteps: 3\n")
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(
        "import torchtune_blah._registry as r\n"
        f"r.RECIPES.append(r.RecipeEntry('blah_tiny_test', {str(tmp_path / 'tiny_blah_recipe.py')!r},\n"
        f"    [('blah_tiny_test_config', {str(tmp_path / 'tiny_blah.yaml')!r}),\n"
        "     ('blah_missing_config', '/nonexistent/missing.yaml')]))\n"
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(hook_dir)}
    return tmp_path, workdir, env


def _tune(args, cwd, env):
    result = subprocess.run([TUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_pth_file_is_installed():
    purelib = sysconfig.get_paths()["purelib"]
    pth = os.path.join(purelib, "torchtune_blah.pth")
    assert os.path.isfile(pth), f"{pth} missing: reinstall with pip install -e . (or pip install .)"
    assert open(pth).read().strip() == "import torchtune_blah._tune_hook"


@pytest.mark.slow
def test_tune_ls_cp_run_see_a_registered_recipe(tiny_registration):
    tmp_path, workdir, env = tiny_registration
    listing = _tune(["ls"], workdir, env)
    rows = [line.split() for line in listing.splitlines()]
    assert ["blah_tiny_test", "blah_tiny_test_config"] in rows
    assert "blah_missing_config" not in listing  # files that do not exist are not registered
    assert ["lora_finetune_single_device", "llama2/7B_lora_single_device"] in rows  # torchtune's own still there

    _tune(["cp", "blah_tiny_test", "copied_recipe.py"], workdir, env)
    _tune(["cp", "blah_tiny_test_config", "copied.yaml"], workdir, env)
    assert (workdir / "copied_recipe.py").read_text() == TINY_RECIPE
    assert (workdir / "copied.yaml").read_text() == "greeting: hello\nsteps: 3\n"

    out = _tune(["run", "blah_tiny_test", "--config", "blah_tiny_test_config", "greeting=world"], workdir, env)
    assert "tiny recipe ran: greeting=world steps=3" in out
    # a config given by path works the same way
    out = _tune(["run", "blah_tiny_test", "--config", str(workdir / "copied.yaml"), "steps=7"], workdir, env)
    assert "tiny recipe ran: greeting=hello steps=7" in out


def test_interpreter_start_imports_nothing_heavy(tmp_path):
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    modules = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "torchtune_blah._tune_hook" in modules, "the .pth hook did not run at start-up"
    heavy = [m for m in modules if m.split(".")[0] in {"torch", "torchtune", "numpy", "datasets", "wrapt"}]
    assert heavy == []


def test_hook_registers_on_torchtune_import(tmp_path):
    code = (
        "import sys; assert 'torchtune._recipe_registry' not in sys.modules\n"
        "import torchtune_blah._registry as r\n"
        "r.RECIPES.append(r.RecipeEntry('blah_probe', sys.argv[1]))\n"
        "from torchtune._recipe_registry import get_all_recipes\n"
        "names = [x.name for x in get_all_recipes()]\n"
        "print(names.count('blah_probe'), names.count('full_finetune_single_device'))\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text("")
    result = subprocess.run([sys.executable, "-c", code, str(probe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]


def test_register_skips_missing_files_and_taken_names(tmp_path, monkeypatch):
    from torchtune import _recipe_registry as tt

    recipe = tmp_path / "r.py"
    recipe.write_text("")
    config = tmp_path / "c.yaml"
    config.write_text("")

    class FakeRegistry:
        Recipe, Config = tt.Recipe, tt.Config
        _ALL_RECIPES = [tt.Recipe("full_finetune_single_device", "x.py", [], False)]

    monkeypatch.setattr(registry, "RECIPES", [
        registry.RecipeEntry("full_finetune_single_device", str(recipe)),  # torchtune's name: not replaced
        registry.RecipeEntry("blah_gone", str(tmp_path / "gone.py")),
        registry.RecipeEntry("blah_ok", str(recipe), [("blah_ok_cfg", str(config)), ("blah_no_cfg", "nope.yaml")]),
    ])
    registry.register(FakeRegistry)
    names = [r.name for r in FakeRegistry._ALL_RECIPES]
    assert names == ["full_finetune_single_device", "blah_ok"]
    assert FakeRegistry._ALL_RECIPES[0].file_path == "x.py"
    assert [c.name for c in FakeRegistry._ALL_RECIPES[1].configs] == ["blah_ok_cfg"]
    assert os.path.isabs(FakeRegistry._ALL_RECIPES[1].configs[0].file_path)


@pytest.mark.slow
def test_wheel_carries_the_pth_the_recipes_configs_and_data(tmp_path):
    # Build from a clean copy: a stale build/ folder would hide a package missing from pyproject.toml.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", "build", "dist", "*.egg-info", ".git", "__pycache__", ".pytest_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "torchtune_blah.pth" in names
    for folder, package in (("components/torchtune_blah", "torchtune_blah"), ("recipes", "torchtune_blah/recipes")):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            rel = os.path.relpath(root, os.path.join(REPO, folder))
            for name in files:
                if name.endswith(".py"):
                    path = os.path.normpath(os.path.join(package, rel, name))
                    assert path in names, f"{path} missing from the wheel: list its package in pyproject.toml"
    assert "torchtune_blah/recipes/__init__.py" in names and "torchtune_blah/configs/__init__.py" in names
    assert "torchtune_blah/data/assets/squad_v2_sample.json" in names
    assert not any(n.startswith(("recipes/", "components/", "configs/")) for n in names)
    for entry in registry.RECIPES:
        assert f"torchtune_blah/recipes/{entry.file}" in names
        assert all(f"torchtune_blah/configs/{f}" in names for _, f in entry.configs)
