"""Building a pause-token model from a torchtune config: shared by training and evaluation."""

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
