# torchtune-blah: a finished run as a Hugging Face model folder or a PEFT adapter.
#
#   tune run blah_export --config blah_export run_dir=/tmp/torchtune-blah/smollm2_135m output_dir=/tmp/blah_hf
#
# Everything that can be checked without weights (stage, output folder, tokenizer, base
# config) is checked first; the folder is then written beside output_dir and renamed into
# place. What the folder holds: torchtune_blah/export.py and the config's comments.

import sys
from dataclasses import dataclass

from omegaconf import DictConfig
from torchtune import config, utils

from torchtune_blah.config_schema import ExportConfig, typed_config
from torchtune_blah.export import export_run, plan_export

log = utils.get_logger("INFO")


@dataclass
class Config(ExportConfig):
    """Every key of this recipe's config, with its default: ``torchtune_blah.config_schema.ExportConfig``'s.
    A copy of this file (``tune cp blah_export my_export.py``) adds its own keys here."""


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="blah_export", cfg=cfg)
    # Read through the schema: a misspelt key fails here, naming it; every key left out has its default.
    cfg = typed_config(cfg, Config, "blah_export")
    plan = plan_export(cfg.run_dir, cfg.output_dir, stage=cfg.stage, format=cfg.format, dtype=cfg.dtype,
                       eval_dirs=list(cfg.eval_dirs or []))
    pause = f"{plan.pause.num} pause tokens ({plan.pause.mode})" if plan.pause.num else "no pause tokens"
    log.info(f"blah_export: {plan.run_dir} stage {plan.stage} ({pause}) -> {plan.output_dir} as {plan.format}, "
             f"{plan.dtype}; tokenizer from {plan.tokenizer_source}")
    export_run(plan)
    log.info(f"blah_export: wrote {plan.output_dir}")


if __name__ == "__main__":
    sys.exit(recipe_main())
