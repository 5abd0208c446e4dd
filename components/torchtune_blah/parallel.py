"""What FSDP2 changes in blah_qlora's loop, as one object handed to it: ``SingleDevice`` or ``FSDP2``.

The loop (recipes/blah_qlora.py) is the same on one device and on N processes, and so is the
model's setup (the recipe's ``_setup_model``: built on the meta device, fresh LoRA weights and
pause rows drawn on the CPU from ``seed``, so every device and any number of ranks start from
the same values). The recipe asks this object to place that model's values (``place``), to sum
over ranks, to gather a whole tensor, and for the optimizer and RNG parts of a checkpoint.
``SingleDevice`` does the plain thing; ``FSDP2`` does what torchtune's ``lora_finetune_distributed``
does:

- the model is sharded (``training.shard_model``: one unit per transformer layer, one per
  ``custom_sharded_layers`` entry, and the root), then every rank loads its shards of the base
  checkpoint and of the adapter;
- the pause rows are sharded like every other parameter, not kept apart: one engine reduces
  every gradient, and clipping, optimizer state and checkpoints need no special case (5 x 8,192
  numbers on a 70B model);
- in-training validation gathers the whole model on every GPU while the ranks answer their
  share of the questions.
"""

from functools import partial
from typing import Any, Callable, Dict, Protocol

import torch
from omegaconf import DictConfig
from torchtune import training
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4

from torchtune_blah.checkpointing import rng_state, set_rng_state
from torchtune_blah.config_schema import ConfigError
from torchtune_blah.model import CHECKPOINT_PREFIX

def init_process_group(device: Any) -> None:
    """Join the process group torchrun describes, one rule for every recipe: NCCL for CUDA tensors
    with gloo beside it for CPU ones (objects gathered, CPU offload), gloo alone on a CPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("cuda:nccl,cpu:gloo" if str(device).startswith("cuda") else "gloo")


class Parallel(Protocol):
    """What the loop asks of "one device or N processes": the model's values placed (and sharded),
    sums over ranks, whole tensors, the optimizer and RNG parts of a checkpoint. ``SingleDevice`` and
    ``FSDP2`` implement it side by side (no inheritance: each says all it does)."""

    world_size: int
    rank: int

    def place(self, model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], device, dtype) -> None: ...
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

    def place(self, model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], device, dtype) -> None:
        """Give the meta-device ``model`` the values of ``state_dict`` (the base checkpoint and the
        adapter, whole tensors) on ``device``; NF4 weights are quantized as they arrive, like
        torchtune's ``load_from_full_model_state_dict`` does for FSDP2's shards."""
        placed, meta = {}, _meta_tensors(model)
        unexpected = [name for name in state_dict if name not in meta]
        for name, value in state_dict.items():
            like = meta.get(name)
            if like is None:
                continue
            value = value.to(device=device, dtype=like.dtype)
            if isinstance(like, NF4Tensor):
                value = to_nf4(value, block_size=like.block_size, scaler_block_size=like.scaler_block_size)
            placed[name] = torch.nn.Parameter(value, requires_grad=like.requires_grad) if isinstance(
                like, torch.nn.Parameter) else value
        model.load_state_dict(placed, strict=False, assign=True)
        _check_loaded(model, unexpected)
        _materialise_the_rest(model, device, dtype)

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

    def place(self, model, state_dict, device, dtype):
        """Shard the meta-device ``model`` (FSDP2 shards NF4 weights only when they are frozen: the
        recipe has set what trains), then every rank loads its shards of ``state_dict``."""
        training.shard_model(
            model=model,
            shard_conditions=[partial(training.get_shard_conditions, names_to_match=self._custom_sharded_layers)],
            cpu_offload=self._cpu_offload,
            reshard_after_forward=self._reshard_after_forward,
        )
        _rope_caches(model, device, dtype)
        _, unexpected = training.load_from_full_model_state_dict(
            model, dict(state_dict), device, cpu_offload=self._cpu_offload)
        _check_loaded(model, unexpected)
        training.validate_no_params_on_meta_device(model)
        self._dist.barrier()
        self._device = device

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


def _meta_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's parameters and buffers by their state-dict names (no ``model.state_dict()``:
    torchtune's QLoRA builders hook it to dequantize NF4 weights, which a meta tensor cannot)."""
    tensors = dict(model.named_buffers())
    tensors.update(model.named_parameters())
    return {name.replace(CHECKPOINT_PREFIX, ""): t for name, t in tensors.items()}


def _check_loaded(model: torch.nn.Module, unexpected) -> None:
    """Every parameter still on the meta device must be one the files do not hold; nothing unknown."""
    still_meta = [n for n, t in _meta_tensors(model).items() if t.is_meta and isinstance(t, torch.nn.Parameter)]
    if still_meta or unexpected:
        raise RuntimeError(f"the base checkpoint does not fit model._component_: no values for {still_meta[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")


def _rope_caches(model: torch.nn.Module, device, dtype) -> None:
    """The RoPE caches (non-persistent buffers, left on meta by a meta-device build), computed on ``device``."""
    with training.set_default_dtype(dtype), device:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()


def _materialise_the_rest(model: torch.nn.Module, device, dtype) -> None:
    """What no file holds: the pause rows and their id buffers (made on the CPU) go to ``device``,
    and the RoPE caches (non-persistent buffers, on meta) are computed there."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and not t.is_meta and t.device != device:
                    store[name] = (torch.nn.Parameter(t.to(device), requires_grad=t.requires_grad)
                                   if isinstance(t, torch.nn.Parameter) else t.to(device))
    _rope_caches(model, device, dtype)
    on_meta = [n for n, t in _meta_tensors(model).items() if t.is_meta]
    if on_meta:
        raise RuntimeError(f"left on the meta device after loading: {on_meta[:5]}")
