"""Every shipped config fits its recipe's typed sections; misspelt keys are refused, named."""

import glob
import os

import pytest
from omegaconf import OmegaConf

from torchtune_blah.config_schema import (ConfigError, EvalConfig, ExportConfig, GenerateConfig, QLoRAConfig,
                                          check_component_keys, check_config)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _schema(path):
    name = os.path.basename(path)
    if name.endswith("_eval.yaml"):
        return EvalConfig, "blah_eval"
    return {"blah_export.yaml": (ExportConfig, "blah_export"),
            "blah_generate.yaml": (GenerateConfig, "blah_generate")}.get(name, (QLoRAConfig, "blah_qlora"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))), ids=os.path.basename)
def test_every_shipped_config_fits_its_schema(path):
    cfg = OmegaConf.load(path)
    schema, recipe = _schema(path)
    check_config(cfg, schema, recipe)
    if schema is QLoRAConfig:
        check_component_keys(cfg.dataset, "dataset")


@pytest.mark.parametrize("config, dotlist, message", [
    ("smollm2_135m_blah", ["embed.max_step=3"], r"embed.max_step is not a blah_qlora key; did you mean embed.max_steps\?"),
    ("smollm2_135m_blah", ["+dataset.split=validation"], r"\+dataset is not a blah_qlora key; did you mean dataset\?"),
    ("smollm2_135m_blah", ["pause_tokens.num=five"], r"pause_tokens.num: Value 'five'"),
    ("smollm2_135m_blah", ["phases=embed"], r"phases"),
    ("smollm2_135m_blah_eval", ["calibrate_metrc=f1"], r"calibrate_metrc is not a blah_eval key; did you mean calibrate_metric\?"),
    ("blah_generate", ["abstain_scor=p_no"], r"abstain_scor is not a blah_generate key; did you mean abstain_score\?"),
    ("blah_export", ["fromat=peft"], r"fromat is not a blah_export key; did you mean format\?"),
])
def test_misspelt_keys_are_refused_with_the_nearest_known_key(config, dotlist, message):
    path = os.path.join(CONFIGS, f"{config}.yaml")
    schema, recipe = _schema(path)
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(dotlist))
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, schema, recipe)


def test_dataset_keys_are_checked_against_the_builder():
    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(CONFIGS, "smollm2_135m_blah.yaml")),
                          OmegaConf.from_dotlist(["dataset.promt_style=multi_turn"]))
    with pytest.raises(ConfigError, match=r"dataset.promt_style is not a key of torchtune_blah.data.squad_chat_dataset; "
                                          r"did you mean dataset.prompt_style\?"):
        check_component_keys(cfg.dataset, "dataset")
    cfg.dataset._component_ = "torchtune_blah.data.no_such_builder"
    with pytest.raises(ConfigError, match="cannot be imported"):
        check_component_keys(cfg.dataset, "dataset")


def test_extra_dataset_keys_of_a_local_source_are_refused():
    from torchtune_blah.data.squad import load_squad_records

    with pytest.raises(ValueError, match=r"\['revison'\] is not a setting of source='bundled_pool'"):
        load_squad_records("bundled_pool", split="train", revison="main")
