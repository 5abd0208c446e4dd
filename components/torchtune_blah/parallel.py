"""What FSDP2 changes in blah_qlora's loop, as one object handed to it: ``SingleDevice`` or ``FSDP2``.

The loop (recipes/blah_qlora.py) is the same on one device and on N processes; it asks this
object to build the model, to sum over ranks, to gather a whole tensor, and for the optimizer
and RNG parts of a checkpoint. ``SingleDevice`` does the plain thing; ``FSDP2`` does what
torchtune's ``lora_finetune_distributed`` does:

- the model is built on the meta device and sharded (``training.shard_model``: one unit per
  transformer layer, one per ``custom_sharded_layers`` entry, and the root), then every rank
  loads its shards of the base checkpoint;
- the pause rows are sharded like every other parameter, not kept apart: one engine reduces
  every gradient, and clipping, optimizer state and checkpoints need no special case (5 x 8,192
  numbers on a 70B model);
- fresh LoRA weights and the initial pause rows are drawn on the CPU from ``seed``, not from
  torchtune's per-rank seed (seed + rank), so every rank, and any number of ranks, start from
  the same values (2 ranks x batch b train like 1 rank x batch 2b:
  tests/test_distributed_training.py);
- in-training validation gathers the whole model on every GPU while the ranks answer their
  share of the questions. Not supported: DoRA.
"""

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch
from omegaconf import DictConfig
from torchtune import config, modules, training

from torchtune_blah.checkpointing import rng_state, set_rng_state
from torchtune_blah.config_schema import ConfigError
from torchtune_blah.model import adapter_parameter_names, build_model
from torchtune_blah.pause import PAUSE_PARAM, PauseEmbedding, PauseTokens, add_pause_embeddings

def init_process_group(device: Any) -> None:
    """Join the process group torchrun describes, one rule for every recipe: NCCL for CUDA tensors
    with gloo beside it for CPU ones (objects gathered, CPU offload), gloo alone on a CPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("cuda:nccl,cpu:gloo" if str(device).startswith("cuda") else "gloo")


# start_from(pause_module, adapter_names) -> the adapter to start from, or None (the fresh one)
StartFrom = Callable[[Optional[PauseEmbedding], List[str]], Optional[Dict[str, torch.Tensor]]]


class Parallel(Protocol):
    """What the loop asks of "one device or N processes": the model built (and sharded), sums over
    ranks, whole tensors, the optimizer and RNG parts of a checkpoint. ``SingleDevice`` and
    ``FSDP2`` implement it side by side (no inheritance: each says all it does)."""

    world_size: int
    rank: int

    def build_model(self, cfg: DictConfig, base_state_dict: Dict[str, Any], pause: PauseTokens, device, dtype,
                    tokenizer: Any, seed: int, start_from: "StartFrom") -> Tuple[torch.nn.Module, Any]: ...
    def all_reduce(self, value): ...
    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def set_full_tensor(self, param: torch.nn.Parameter, value: torch.Tensor) -> None: ...
    def barrier(self) -> None: ...
    def optimizer_state(self, model, optimizer) -> Dict[str, Any]: ...
    def load_optimizer_state(self, model, optimizer, state: Dict[str, Any]) -> None: ...
    def rng_state(self) -> Any: ...
    def set_rng_state(self, state: Any) -> None: ...
    def full_model_state_dict(self, model) -> Dict[str, torch.Tensor]: ...
    def answer(self, model, records: list, answer: Callable[[list], list]) -> list: ...
    def cleanup(self) -> None: ...


class SingleDevice:
    """One process, one device: collectives are the identity."""

    world_size, rank = 1, 0

    def build_model(self, cfg: DictConfig, base_state_dict: Dict[str, Any], pause: PauseTokens, device, dtype,
                    tokenizer: Any, seed: int, start_from: StartFrom) -> Tuple[torch.nn.Module, Any]:
        model, pause_module = build_model(cfg.model, base_state_dict, pause, device, dtype,
                                          pause_init=cfg.get("pause_init"), tokenizer=tokenizer)
        adapter = start_from(pause_module, adapter_parameter_names(model))
        if adapter:
            model.load_state_dict(adapter, strict=False)
        if cfg.get("compile", False):
            training.compile_model(model)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        return model, pause_module

    def all_reduce(self, value):
        """Sum over ranks."""
        return value

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor (FSDP2: gathered from every rank's shard; all ranks must call it)."""
        return tensor.detach()

    def set_full_tensor(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value.to(param.device, param.dtype))

    def barrier(self) -> None:
        pass

    def optimizer_state(self, model, optimizer) -> Dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model, optimizer, state: Dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def rng_state(self) -> Any:
        return rng_state()

    def set_rng_state(self, state: Any) -> None:
        set_rng_state(state)

    def full_model_state_dict(self, model) -> Dict[str, torch.Tensor]:
        """The whole model's state dict on CPU (rank 0; other ranks may get {})."""
        return {k: v.cpu() for k, v in model.state_dict().items()}

    def answer(self, model, records: list, answer: Callable[[list], list]) -> list:
        """``answer(records)`` -> one result row per record (rank 0 gets them all)."""
        return answer(records)

    def cleanup(self) -> None:
        pass


class FSDP2:
    """FSDP2 over every process of ``tune run --nproc_per_node N`` (the process group is up)."""

    def __init__(self, cfg: DictConfig) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        # torchtune's qlora_* builders quantize; a builder with a quantize_base argument says so itself.
        quantized = bool(cfg.model.get("quantize_base", "qlora_" in str(cfg.model._component_)))
        if quantized and self.world_size == 1:
            raise ConfigError(
                "blah_qlora_distributed with one process and an NF4 (QLoRA) base: torchao's NF4 tensors cannot "
                "be FSDP2-sharded over a single rank. Use `tune run blah_qlora` on one GPU, or --nproc_per_node 2+.")
        self._cpu_offload = bool(cfg.get("fsdp_cpu_offload", False))
        self._reshard_after_forward = bool(cfg.get("fsdp_reshard_after_forward", True))
        self._custom_sharded_layers = cfg.get("custom_sharded_layers", None)

    def build_model(self, cfg, base_state_dict, pause, device, dtype, tokenizer, seed, start_from):
        with training.set_default_dtype(dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        if any(hasattr(m, "magnitude") for m in model.modules()):
            raise ConfigError("model: DoRA layers are not supported by blah_qlora_distributed; use LoRA")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapter = _fresh_lora_weights(model, dtype)
            pause_module = add_pause_embeddings(model, pause, tokenizer=tokenizer, table=base_state_dict[TOK_EMBEDDINGS],
                                                **dict(cfg.get("pause_init") or {}))
        # Files that replace the fresh values are read before sharding, into whole tensors.
        adapter = start_from(pause_module, adapter_parameter_names(model)) or adapter
        # FSDP2 shards NF4 weights only when they are frozen; each phase then sets what trains.
        trainable = set(adapter_parameter_names(model)) | ({PAUSE_PARAM} if pause_module is not None else set())
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        if cfg.get("compile", False):
            training.compile_model(model, verbose=self.rank == 0)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        training.shard_model(
            model=model,
            shard_conditions=[partial(training.get_shard_conditions, names_to_match=self._custom_sharded_layers)],
            cpu_offload=self._cpu_offload,
            reshard_after_forward=self._reshard_after_forward,
        )
        with training.set_default_dtype(dtype), device:
            for m in model.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()
        missing, unexpected = training.load_from_full_model_state_dict(
            model, {**base_state_dict, **adapter}, device, cpu_offload=self._cpu_offload)
        if missing or unexpected:
            raise RuntimeError(f"the base checkpoint does not fit model._component_ {cfg.model._component_}: "
                               f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        training.validate_no_params_on_meta_device(model)
        self._dist.barrier()
        self._device = device
        return model, pause_module

    def all_reduce(self, value):
        self._dist.all_reduce(value)
        return value

    def full_tensor(self, tensor):
        from torch.distributed.tensor import DTensor

        tensor = tensor.detach()
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def set_full_tensor(self, param, value):
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.copy_(value)

    def barrier(self):
        self._dist.barrier()

    def optimizer_state(self, model, optimizer):
        return training.get_full_optimizer_state_dict(model, optimizer, self.rank == 0, device=self._device)

    def load_optimizer_state(self, model, optimizer, state):
        training.load_from_full_optimizer_state_dict(model, optimizer, state, self._device)

    def rng_state(self):
        # Each rank has its own RNG stream (LoRA dropout): keep every rank's.
        states = [None] * self.world_size
        self._dist.all_gather_object(states, rng_state())
        return states

    def set_rng_state(self, state):
        set_rng_state(state[self.rank])

    def full_model_state_dict(self, model):
        return training.gather_cpu_state_dict(model, self.rank == 0, device=self._device)

    def answer(self, model, records, answer):
        """Each rank answers every world_size-th record; rank 0 gets all rows.

        Generation makes a data-dependent number of forward calls, and an FSDP2 forward
        all-gathers each layer with every rank. So the whole model is gathered once, kept
        gathered while the ranks answer on their own (no collective in between), then sharded
        again: validation needs the whole model's memory on every GPU while it runs."""
        from torch.distributed.fsdp import FSDPModule

        # shard_model gave every unit, the root included, fsdp_reshard_after_forward: restored after.
        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp_modules:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            mine = answer(records[self.rank::self.world_size])
        finally:
            for m in fsdp_modules:
                m.set_reshard_after_forward(self._reshard_after_forward, recurse=False)
                m.reshard()
        shards = [None] * self.world_size
        self._dist.all_gather_object(shards, mine)
        rows = [None] * len(records)
        for rank, shard in enumerate(shards):
            rows[rank::self.world_size] = shard
        return rows

    def cleanup(self):
        self._dist.barrier()  # no rank tears the process group down while another still uses it
        self._dist.destroy_process_group()


TOK_EMBEDDINGS = "tok_embeddings.weight"


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
