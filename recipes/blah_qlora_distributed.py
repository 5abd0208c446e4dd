# torchtune-blah: the two-phase pause-token recipe on several GPUs, with FSDP2.
#
#   tune run --nproc_per_node 2 blah_qlora_distributed --config llama3_8b_blah_2gpu
#
# The same two phases, loop, outputs and resume as blah_qlora (the loop is
# torchtune_blah.two_phase); what changes is torchtune's distributed machinery,
# as in its lora_finetune_distributed recipe:
#   - the model is built on the meta device and sharded with FSDP2
#     (training.shard_model / fully_shard: one unit per transformer layer, one per
#     custom_sharded_layers entry, and the root),
#     then every rank loads its shards of the base checkpoint;
#   - each rank reads every world_size-th sample (StatefulDistributedSampler), the step's
#     loss and gradients are normalised by all ranks' tokens together;
#   - rank 0 writes every file (checkpoints are gathered to it); all ranks read them on resume.
#
# The pause rows are sharded by FSDP2 like every other parameter, not kept apart:
# then one engine reduces every gradient, and clipping, the optimizer state and the
# checkpoints need no special case. They are 5 x 8,192 numbers on a 70B model, so
# gathering them with the root unit costs nothing measurable.
#
# Fresh LoRA weights and the initial pause rows are drawn on the CPU from `seed`,
# not from torchtune's per-rank seed (seed + rank): every rank, and any number of
# ranks, start from the same values. So 2 ranks x batch b train like 1 rank x batch 2b,
# up to the order in which floats are summed (tests/test_distributed_training.py).
#
# In-training validation gathers the whole model on every GPU while the ranks answer
# their share of the held-out questions (see _answer_validation_records). Not supported: DoRA.

import sys
from functools import partial
from typing import Any, Dict

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torchtune import config, modules, training, utils

from torchtune_blah.checkpointing import rng_state, set_rng_state
from torchtune_blah.model import adapter_parameter_names
from torchtune_blah.pause import add_pause_embeddings
from torchtune_blah.recipe_config import ConfigError
from torchtune_blah.two_phase import PAUSE_PARAM, TwoPhaseRecipe, run_recipe

TOK_EMBEDDINGS = "tok_embeddings.weight"


class BlahQLoRARecipeDistributed(TwoPhaseRecipe):
    """Two phases, one model, FSDP2 over every process of ``tune run --nproc_per_node N``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.world_size, self.rank = utils.get_world_size_and_rank()
        # torchtune's qlora_* builders quantize; a builder with a quantize_base argument says so itself.
        quantized = bool(cfg.model.get("quantize_base", "qlora_" in str(cfg.model._component_)))
        if quantized and self.world_size == 1:
            raise ConfigError(
                "blah_qlora_distributed with one process and an NF4 (QLoRA) base: torchao's NF4 tensors cannot "
                "be FSDP2-sharded over a single rank. Use `tune run blah_qlora` on one GPU, or --nproc_per_node 2+.")
        super().__init__(cfg)
        self._fsdp_cpu_offload = bool(cfg.get("fsdp_cpu_offload", False))
        self._reshard_after_forward = bool(cfg.get("fsdp_reshard_after_forward", True))
        self._custom_sharded_layers = cfg.get("custom_sharded_layers", None)

    # ------------------------------------------------------------------ model

    def _build_model(self, cfg: DictConfig, base_state_dict: Dict[str, Any]):
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        if any(hasattr(m, "magnitude") for m in model.modules()):
            raise ConfigError("model: DoRA layers are not supported by blah_qlora_distributed; use LoRA")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            adapter = _fresh_lora_weights(model, self._dtype)
            pause_module = add_pause_embeddings(model, self._pause, tokenizer=self._tokenizer,
                                                table=base_state_dict[TOK_EMBEDDINGS],
                                                **dict(cfg.get("pause_init") or {}))
        # Files that replace the fresh values are read before sharding, into whole tensors.
        adapter = self._start_from_files(cfg, pause_module, adapter_parameter_names(model)) or adapter
        # FSDP2 shards NF4 weights only when they are frozen; each phase then sets what trains.
        trainable = set(adapter_parameter_names(model)) | ({PAUSE_PARAM} if pause_module is not None else set())
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        if cfg.get("compile", False):
            training.compile_model(model, verbose=self._is_rank_zero)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        training.shard_model(
            model=model,
            shard_conditions=[partial(training.get_shard_conditions, names_to_match=self._custom_sharded_layers)],
            cpu_offload=self._fsdp_cpu_offload,
            reshard_after_forward=self._reshard_after_forward,
        )
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()
        missing, unexpected = training.load_from_full_model_state_dict(
            model, {**base_state_dict, **adapter}, self._device, cpu_offload=self._fsdp_cpu_offload)
        if missing or unexpected:
            raise RuntimeError(f"the base checkpoint does not fit model._component_ {cfg.model._component_}: "
                               f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        training.validate_no_params_on_meta_device(model)
        dist.barrier()
        return model, pause_module

    # ------------------------------------------------------------------ validation

    def _answer_validation_records(self, records=None) -> list:
        """Each rank answers every world_size-th held-out question; rank 0 gets all rows.

        Generation makes a data-dependent number of forward calls, and an FSDP2 forward
        all-gathers each layer with every rank. So the whole model is gathered once, kept
        gathered while the ranks answer on their own (no collective in between), then sharded
        again: validation needs the whole model's memory on every GPU while it runs.
        """
        # shard_model gave every unit, the root included, fsdp_reshard_after_forward: restored after.
        fsdp_modules = [m for m in self._model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp_modules:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            mine = super()._answer_validation_records(self._val_records[self.rank::self.world_size])
        finally:
            for m in fsdp_modules:
                m.set_reshard_after_forward(self._reshard_after_forward, recurse=False)
                m.reshard()
        shards = [None] * self.world_size
        dist.all_gather_object(shards, mine)
        rows = [None] * len(self._val_records)
        for rank, shard in enumerate(shards):
            rows[rank::self.world_size] = shard
        return rows

    # ------------------------------------------------------------------ collectives

    def _all_reduce(self, value):
        dist.all_reduce(value)
        return value

    def _full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def _set_full_tensor(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.copy_(value)

    def _barrier(self) -> None:
        dist.barrier()

    def _optimizer_state(self, optimizer) -> Dict[str, Any]:
        return training.get_full_optimizer_state_dict(self._model, optimizer, self._is_rank_zero,
                                                      device=self._device)

    def _load_optimizer_state(self, optimizer, state: Dict[str, Any]) -> None:
        training.load_from_full_optimizer_state_dict(self._model, optimizer, state, self._device)

    def _rng_state(self) -> Any:
        # Each rank has its own RNG stream (LoRA dropout): keep every rank's.
        states = [None] * self.world_size
        dist.all_gather_object(states, rng_state())
        return states

    def _set_rng_state(self, state: Any) -> None:
        set_rng_state(state[self.rank])

    def _full_model_state_dict(self) -> Dict[str, torch.Tensor]:
        return training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)

    def cleanup(self) -> None:
        super().cleanup()
        dist.barrier()  # no rank tears the process group down while another still uses it
        dist.destroy_process_group()


def _fresh_lora_weights(model: torch.nn.Module, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Every LoRA layer's initial A and B (torchtune's own init), drawn on the CPU.

    The layers are on the meta device: their A/B are materialised one at a time,
    initialised, copied out and put back on meta, where FSDP2 finds them.
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


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    if not training.is_distributed():
        raise RuntimeError("blah_qlora_distributed runs under a distributed launcher: "
                           "tune run --nproc_per_node N blah_qlora_distributed --config ... "
                           "(one GPU: tune run blah_qlora)")
    dist.init_process_group("cuda:nccl,cpu:gloo" if str(cfg.device).startswith("cuda") else "gloo")
    if cfg.get("fsdp_cpu_offload", False):
        training.set_torch_num_threads()  # the optimizer steps on the CPU: use its cores (torchtune's way)
    config.log_config(recipe_name="BlahQLoRARecipeDistributed", cfg=cfg)
    run_recipe(BlahQLoRARecipeDistributed(cfg=cfg), cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
