"""Building a pause-token model from a torchtune config: shared by training and evaluation."""

import os
from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, training
from torchtune.modules.peft import get_adapter_params

from torchtune_blah.pause import PauseEmbedding, PauseTokens, add_pause_embeddings


def build_model(
    cfg_model: DictConfig,
    base_state_dict: Dict[str, Any],
    pause: PauseTokens,
    device: torch.device,
    dtype: torch.dtype,
    pause_init: Optional[DictConfig] = None,
    tokenizer: Any = None,
) -> Tuple[nn.Module, Optional[PauseEmbedding]]:
    """Instantiate ``cfg_model``, load the base weights, then add the pause embeddings.

    The order matters: the pause rows' ``mean``/``copy`` initialisation reads the
    loaded base table. Only adapter weights may be missing from the base checkpoint.
    """
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg_model)
    missing, unexpected = model.load_state_dict(base_state_dict, strict=False)
    adapter_keys = set(adapter_parameter_names(model))
    missing = [k for k in missing if k not in adapter_keys]
    if missing or unexpected:
        raise RuntimeError(f"the base checkpoint does not fit model._component_ {cfg_model._component_}: "
                           f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    init = dict(pause_init or {})
    pause_module = add_pause_embeddings(model, pause, tokenizer=tokenizer, **init)
    return model, pause_module


def adapter_parameter_names(model: nn.Module) -> list:
    """Names of the LoRA/DoRA parameters."""
    return list(get_adapter_params(model))


def lora_settings(model: nn.Module) -> Dict[str, Any]:
    """Rank, alpha and PEFT target modules, read off the model's LoRA layers."""
    modules = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if hasattr(m, "lora_a")}
    if not modules:
        raise ValueError("the model has no LoRA layers: the lora phase needs a LoRA/QLoRA model builder "
                         "(e.g. model._component_: torchtune.models.llama3.qlora_llama3_8b)")
    any_module = next(iter(modules.values()))
    return {"r": any_module.rank, "lora_alpha": any_module.alpha, "target_modules": sorted(modules),
            "peft_type": "LORA"}


STAGES = ("base", "embed", "lora")
RUN_CONFIG_FILE = "blah_config.yaml"


def read_run_config(run_dir: str) -> DictConfig:
    """The resolved config a ``blah_qlora`` run saved in its output_dir."""
    from omegaconf import OmegaConf

    path = os.path.join(str(run_dir), RUN_CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"run_dir: {path} not found; run_dir must be a blah_qlora output_dir")
    return OmegaConf.load(path)


def resolve_stage(run_dir: str, stage: str) -> str:
    """``latest`` -> the last finished phase (``base`` when none); a named stage must be finished."""
    from torchtune_blah.checkpointing import phase_complete

    finished = [s for s in ("embed", "lora") if phase_complete(os.path.join(str(run_dir), s))]
    if stage == "latest":
        return finished[-1] if finished else "base"
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES + ('latest',)}, got {stage!r}")
    if stage != "base" and stage not in finished:
        raise ValueError(f"stage={stage}: {run_dir}/{stage} holds no finished phase "
                         f"(finished: {finished or 'none'})")
    return stage


def load_run_model(
    run_cfg: DictConfig,
    run_dir: str,
    stage: str,
    device: torch.device,
    dtype: torch.dtype,
    staging_dir: str,
    quantize_base: Optional[bool] = None,
) -> Tuple[nn.Module, Optional[PauseTokens]]:
    """The model a ``blah_qlora`` run produced, ready for inference.

    ``stage``: ``base`` (no pause tokens, no adapter: the seed's "base model" row),
    ``embed`` (base + the embed phase's pause rows) or ``lora`` (base + pause rows +
    adapter). What the run's artifacts say (pause ids, mode, count) comes from them,
    not from the config. ``quantize_base`` overrides the run's NF4 setting.
    """
    import shutil

    from torchtune_blah.pause import load_pause_embeddings, pause_tokens, pause_tokens_from_metadata, \
        read_pause_embeddings

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    stage_dir = os.path.join(run_dir, stage)
    pause = None
    if stage != "base" and os.path.isfile(os.path.join(stage_dir, "pause_embeddings.safetensors")):
        pause = pause_tokens_from_metadata(read_pause_embeddings(stage_dir)[1])
    cfg_model = run_cfg.model.copy()
    if quantize_base is not None and "quantize_base" in cfg_model:
        cfg_model.quantize_base = quantize_base
    checkpointer = config.instantiate(run_cfg.checkpointer, output_dir=staging_dir)
    base_state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
    shutil.rmtree(staging_dir, ignore_errors=True)
    model, pause_module = build_model(cfg_model, base_state_dict, pause or pause_tokens(num=0), device, dtype)
    del base_state_dict
    if pause_module is not None:
        load_pause_embeddings(pause_module, stage_dir)
    adapter_names = adapter_parameter_names(model)
    if stage == "lora":
        adapter = torch.load(os.path.join(stage_dir, "adapter_model.pt"), map_location=device, weights_only=True)
        missing = set(adapter_names) - set(adapter)
        unexpected = set(adapter) - set(adapter_names)
        if missing or unexpected:
            raise ValueError(f"{stage_dir}/adapter_model.pt does not fit the run's model: missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        model.load_state_dict(adapter, strict=False)
    else:  # base / embed: the LoRA layers exist in the run's model but must not act
        for module in model.modules():
            if hasattr(module, "disabled") and callable(getattr(module, "adapter_params", None)):
                module.disabled = True
    model.eval()
    return model, pause
