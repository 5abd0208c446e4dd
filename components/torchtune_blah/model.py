"""Building a pause-token model from a torchtune config: shared by training and evaluation."""

from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, training
from torchtune.modules.peft import get_adapter_params

from torchtune_blah.pause import PauseEmbedding, PauseTokens, add_pause_embeddings
from torchtune_blah.run_dir import STAGES, RunDir
from torchtune_blah.torchtune_patches import rms_norm_fp32_weight


def build_model(
    cfg_model: DictConfig,
    base_state_dict: Optional[Dict[str, Any]],
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
    if base_state_dict is not None:  # None: the builder's own weights (blah_estimate's fake tensors)
        missing, unexpected = model.load_state_dict(base_state_dict, strict=False)
        adapter_keys = set(adapter_parameter_names(model))
        missing = [k for k in missing if k not in adapter_keys]
        if missing or unexpected:
            raise RuntimeError(f"the base checkpoint does not fit model._component_ {cfg_model._component_}: "
                               f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    init = dict(pause_init or {})
    pause_module = add_pause_embeddings(model, pause, tokenizer=tokenizer, **init)
    return model, pause_module


TOK_EMBEDDINGS = "tok_embeddings.weight"  # the base embedding table, by its state-dict name
# activation checkpointing wraps each layer and puts this into named_parameters(), not into the state dict
CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def fresh_lora_weights(model: nn.Module, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Every LoRA layer's initial A and B (torchtune's own ``initialize_parameters``), drawn on the
    CPU from the global RNG, layer by layer in module order: the same values on any device and for
    any number of processes.

    ``model`` is on the meta device (blah_qlora builds there): each layer's A/B are materialised,
    initialised, copied out and put back on meta, where the recipe's loading finds them.
    """
    weights = {}
    with training.set_default_dtype(dtype):
        for name, m in model.named_modules():
            if not (hasattr(m, "lora_a") and hasattr(m, "initialize_parameters")):
                continue
            m.lora_a.to_empty(device="cpu")
            m.lora_b.to_empty(device="cpu")
            m.initialize_parameters()
            weights[f"{name}.lora_a.weight"] = m.lora_a.weight.detach().clone()
            weights[f"{name}.lora_b.weight"] = m.lora_b.weight.detach().clone()
            m.lora_a.to_empty(device="meta")
            m.lora_b.to_empty(device="meta")
    expected = set(adapter_parameter_names(model))
    if set(weights) != expected:
        raise RuntimeError(f"LoRA layers not understood: {sorted(expected ^ set(weights))[:3]}")
    return weights


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


def load_run_model(
    run_cfg: DictConfig,
    run_dir: str,
    stage: str,
    device: torch.device,
    dtype: torch.dtype,
    staging_dir: str,
    quantize_base: Optional[bool] = None,
) -> Tuple[nn.Module, PauseTokens]:
    """The model a ``blah_qlora`` run produced, ready for inference.

    ``stage``: ``base`` (no pause tokens, no adapter: the article's "base model" row),
    ``embed`` (base + the embed phase's pause rows) or ``lora`` (base + pause rows +
    adapter). What the run's artifacts say (pause ids, mode, count) comes from them,
    not from the config. ``quantize_base`` overrides the run's NF4 setting.
    """
    import shutil

    from torchtune_blah.pause import NO_PAUSE, load_pause_embeddings, pause_tokens_from_metadata, \
        read_pause_embeddings

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    run = RunDir(run_dir)
    stage_dir = run.stage_dir(stage)
    pause = NO_PAUSE
    if run.has_pause_rows(stage):
        pause = pause_tokens_from_metadata(read_pause_embeddings(stage_dir)[1])
    cfg_model = run_cfg.model.copy()
    if quantize_base is not None and "quantize_base" in cfg_model:
        cfg_model.quantize_base = quantize_base
    checkpointer = config.instantiate(run_cfg.checkpointer, output_dir=staging_dir)
    base_state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
    shutil.rmtree(staging_dir, ignore_errors=True)
    model, pause_module = build_model(cfg_model, base_state_dict, pause, device, dtype)
    del base_state_dict
    if pause_module is not None:
        load_pause_embeddings(pause_module, stage_dir)
    adapter_names = adapter_parameter_names(model)
    if stage == "lora":
        model.load_state_dict(run.load_adapter(stage, adapter_names, device), strict=False)
    else:  # base / embed: the LoRA layers exist in the run's model but must not act
        for module in model.modules():
            if hasattr(module, "disabled") and callable(getattr(module, "adapter_params", None)):
                module.disabled = True
    rms_norm_fp32_weight(model)  # (torchtune_patches: the fused kernel, the same output)
    model.eval()
    return model, pause
