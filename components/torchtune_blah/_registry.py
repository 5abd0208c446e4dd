"""Our recipes and configs, as torchtune's CLI should list them.

``register`` is called by the start-up hook (``_tune_hook.py``) right after
torchtune imports ``torchtune._recipe_registry``. torchtune joins a recipe's
``file_path`` onto its own install directory; an absolute path survives that
join, so ``tune cp`` and ``tune run`` find our files wherever pip put them.

Only files that exist are registered: a recipe appears here in the same commit
that adds it.
"""

import logging
import os
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import List, Tuple

log = logging.getLogger(__name__)


@dataclass
class RecipeEntry:
    """A recipe file and its configs.

    ``file`` is relative to the ``torchtune_blah.recipes`` package, config files
    (second item of each pair) to ``torchtune_blah.configs``; absolute paths are
    taken as they are.
    """

    name: str
    file: str
    configs: List[Tuple[str, str]] = field(default_factory=list)
    distributed: bool = False  # runs under `tune run --nproc_per_node N`


# Each recipe lands here with its file.
RECIPES: List[RecipeEntry] = [
    RecipeEntry("blah_qlora", "blah_qlora.py", [
        ("llama3_8b_blah", "llama3_8b_blah.yaml"),
        ("llama3_2_1b_blah", "llama3_2_1b_blah.yaml"),
        ("smollm2_135m_blah", "smollm2_135m_blah.yaml"),
        ("smollm2_1_7b_blah", "smollm2_1_7b_blah.yaml"),
        ("qwen2_5_1_5b_blah", "qwen2_5_1_5b_blah.yaml"),
        ("qwen2_5_3b_blah", "qwen2_5_3b_blah.yaml"),
        ("demo_cpu_blah", "demo_cpu_blah.yaml"),
    ]),
    RecipeEntry("blah_qlora_distributed", "blah_qlora_distributed.py", distributed=True, configs=[
        ("llama3_8b_blah_2gpu", "llama3_8b_blah_2gpu.yaml"),
        ("llama3_3_70b_blah", "llama3_3_70b_blah.yaml"),
    ]),
    RecipeEntry("blah_eval", "blah_eval.py", distributed=True, configs=[
        ("llama3_8b_blah_eval", "llama3_8b_blah_eval.yaml"),
        ("smollm2_135m_blah_eval", "smollm2_135m_blah_eval.yaml"),
        ("smollm2_1_7b_blah_eval", "smollm2_1_7b_blah_eval.yaml"),
        ("qwen2_5_1_5b_blah_eval", "qwen2_5_1_5b_blah_eval.yaml"),
        ("qwen2_5_3b_blah_eval", "qwen2_5_3b_blah_eval.yaml"),
        ("demo_cpu_blah_eval", "demo_cpu_blah_eval.yaml"),
    ]),
    # Reads any blah_qlora config (tune run resolves a config name across recipes).
    RecipeEntry("blah_estimate", "blah_estimate.py"),
    RecipeEntry("blah_export", "blah_export.py", [("blah_export", "blah_export.yaml")]),
    RecipeEntry("blah_generate", "blah_generate.py", [("blah_generate", "blah_generate.yaml")]),
]


def _package_dir(package: str) -> str:
    spec = find_spec(package)
    return list(spec.submodule_search_locations)[0]


def register(registry_module) -> None:
    """Append every entry of ``RECIPES`` whose file exists to torchtune's registry."""
    Recipe, Config = registry_module.Recipe, registry_module.Config
    all_recipes = registry_module._ALL_RECIPES
    if not RECIPES:
        return
    recipes_dir = _package_dir("torchtune_blah.recipes")
    configs_dir = _package_dir("torchtune_blah.configs")
    taken = {r.name for r in all_recipes} | {c.name for r in all_recipes for c in r.configs}
    for entry in RECIPES:
        recipe_path = os.path.join(recipes_dir, entry.file)
        if entry.name in taken or not os.path.isfile(recipe_path):
            log.warning("torchtune-blah: not registering recipe %r (name taken or file missing: %s)",
                        entry.name, recipe_path)
            continue
        configs = []
        for config_name, config_file in entry.configs:
            config_path = os.path.join(configs_dir, config_file)
            if config_name in taken or not os.path.isfile(config_path):
                log.warning("torchtune-blah: not registering config %r (name taken or file missing: %s)",
                            config_name, config_path)
                continue
            configs.append(Config(name=config_name, file_path=config_path))
            taken.add(config_name)
        all_recipes.append(
            Recipe(name=entry.name, file_path=recipe_path, configs=configs, supports_distributed=entry.distributed)
        )
        taken.add(entry.name)
