"""What a GPU run needs, known on a CPU: peak memory by category and FLOPs of blah_qlora's steps and
answering, measured on fake tensors (``tune run blah_estimate``; the recipe assembles the steps,
this module counts, and builds without data. One module over 400 lines on purpose: what is
counted and what is faked are read together).

The model is built inside PyTorch's ``FakeTensorMode``: tensors with a shape, dtype and device but
no data. With a ``ShapeEnv``, torchao's NF4 quantization, LoRA, activation checkpointing and
boolean indexing run on them, an 8B-wide layer in well under a second. Memory is counted where it
lives, never guessed from a formula where the step can be run:

- parameters and buffers: every storage the model holds, each once (a tied output projection
  shares the embedding's), an NF4 tensor through its inner tensors (4-bit data, block scalers);
- gradients: what ``.grad`` holds after a backward pass;
- optimizer state: the optimizer's own tensors after a step; bitsandbytes' 8-bit optimizers
  cannot run on fake tensors, so their state is what they allocate, counted exactly
  (``bnb_8bit_state_bytes``);
- activations: the peak of the bytes created and still alive during a micro-batch's forward and
  backward (``LiveBytes``: a dispatch mode that sees each op's fresh outputs and when they die);
- the optimizer step's temporaries (gradient clipping, the update), measured the same way.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the same step (recomputation
under activation checkpointing included). Ops that only move data are not FLOPs.

While the steps run, the default device is ``meta``: a tensor that our code (or torchtune's)
creates without ``device=`` lands there and meets the model's tensors in the first op, where
fake tensors refuse to mix devices (``FakeTensorDeviceMismatchError``). On a GPU the same line
would make a CPU tensor meet CUDA ones; here it fails on the CPU (``tests/test_device.py``).
"""

import inspect
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

GiB = 2 ** 30
# Card sizes of the verdicts, as vendors name them (a "24 GB" card holds 24 GiB: 24,564 MiB on an RTX 4090).
CARDS_GB = (8, 12, 16, 24, 48, 80)
# What CUDA itself holds besides torch's tensors: the context and kernels (~0.3-0.6 GiB with
# lazy module loading), cuBLAS/cuDNN workspaces and the caching allocator's fragmentation. Not
# measured here (no GPU): a stated allowance, added to every verdict and shown on its own.
CUDA_ALLOWANCE_GIB = 1.0
# Dense bf16 tensor-core peaks (FP32 accumulate), TFLOP/s, from the vendors' data sheets.
GPU_PEAK_TFLOPS = {"rtx3090": 71.0, "rtx4090": 165.2, "a100": 312.0, "h100": 989.4}
# Model FLOPs utilisation assumed for tokens/s, from torchtune's published QLoRA Llama 3.1 8B on
# one RTX 4090 (batch 2, packed to 2,048 tokens, compile on): 2,413 tokens/s at 44.08 GFLOP per
# token as counted here (forward, recomputation and backward; `python benchmarks/estimate_anchor.py`),
# so 2,413 x 44.08e9 / 165.2e12 = 64% of the card's peak. A run without compile is slower.
ANCHOR_GPU, ANCHOR_TOKENS_PER_S, ANCHOR_FLOPS_PER_TOKEN = "rtx4090", 2413.0, 44.08e9
BNB_BLOCK = 256  # bitsandbytes' 8-bit blockwise optimizers: one fp32 absmax per 256 elements per state
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit state


def assumed_mfu() -> float:
    return ANCHOR_TOKENS_PER_S * ANCHOR_FLOPS_PER_TOKEN / (GPU_PEAK_TFLOPS[ANCHOR_GPU] * 1e12)


@contextmanager
def fake_tensors() -> Iterator[FakeTensorMode]:
    """Within: tensors are fake, and NF4 quantization and boolean indexing run on them (a
    ShapeEnv gives a boolean mask's count a symbol instead of refusing); the two torchtune
    methods that read tensor data (the KV cache's position check, Llama 3.1+'s RoPE scaling)
    are adapted for the duration."""
    with FakeTensorMode(shape_env=ShapeEnv()) as mode, kv_cache_without_position_check(), \
            scaled_rope_on_real_tensors(mode):
        yield mode


@contextmanager
def tensors_without_device_on_meta() -> Iterator[None]:
    """Within: a tensor created without ``device=`` is a ``meta`` tensor, which fake CPU tensors
    refuse to meet. Our model lives on (fake) CPU as a stand-in for CUDA."""
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)


@contextmanager
def kv_cache_without_position_check() -> Iterator[None]:
    """Within: torchtune's ``KVCache.update`` without its ``assert cache_pos[0] + seq_len <=
    max_seq_len``, a check on the cache's data, which fake tensors do not have (the estimate's
    lengths fit the cache by construction). Everything else is torchtune 0.6.1's method."""
    from torchtune.modules import KVCache

    original = KVCache.update

    def update(self, k_val, v_val):
        seq_len = k_val.shape[2]
        if k_val.shape[0] > self.k_cache.shape[0]:
            raise ValueError(f"The current cache has been setup with a batch size of {self.k_cache.shape[0]}, "
                             f"but found new key tensors with batch size {k_val.shape[0]}!")
        self.k_cache[:, :, self.cache_pos[:seq_len]] = k_val
        self.v_cache[:, :, self.cache_pos[:seq_len]] = v_val
        self.cache_pos.add_(seq_len)
        return self.k_cache, self.v_cache

    KVCache.update = update
    try:
        yield
    finally:
        KVCache.update = original


@contextmanager
def scaled_rope_on_real_tensors(mode: FakeTensorMode) -> Iterator[None]:
    """Within: Llama 3.1+'s scaled RoPE computes its (small) cos/sin cache on real tensors, then
    hands it to ``mode`` as a fake one. Its frequency scaling branches on each frequency's value,
    which fake tensors do not have."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

    original = Llama3ScaledRoPE.rope_init

    def rope_init(self):
        with unset_fake_temporarily(), torch.device("cpu"):
            original(self)
            real = {name: buf for name, buf in self.named_buffers(recurse=False)}
        for name, buf in real.items():
            setattr(self, name, mode.from_tensor(buf))

    Llama3ScaledRoPE.rope_init = rope_init
    try:
        yield
    finally:
        Llama3ScaledRoPE.rope_init = original


class _CrossEntropyKeepingLogits(torch.autograd.Function):
    """Cross-entropy (sum) of bf16 logits as ``torch.compile`` makes it: what backward keeps is
    the logits themselves (alive anyway) and one fp32 log-sum-exp per row, not eager's fp32
    upcast of every logit; backward recomputes the softmax. (Inductor fuses the upcast into the
    reduction, so its transients are smaller than the ones this version makes.)"""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        valid = labels != ignore_index
        safe = labels.masked_fill(~valid, 0)
        lse = torch.logsumexp(logits.float(), dim=-1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        return ((lse - picked) * valid).sum()

    @staticmethod
    def backward(ctx, grad):
        logits, safe, valid, lse = ctx.saved_tensors
        g = torch.exp(logits.float() - lse[:, None])
        g.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
        g.mul_((grad * valid)[:, None])
        return g.to(logits.dtype), None, None


@contextmanager
def compiled_loss_memory(loss_fn: Any, compiled: bool) -> Iterator[None]:
    """Within (when ``compiled``): torchtune's chunked cross-entropy keeps for backward what
    ``compile: true`` keeps (``_CrossEntropyKeepingLogits``). Compile is not run on fake tensors;
    this is its effect on the loss, which is where it changes memory most (eager keeps an fp32
    copy of every logit: 2 GiB for 4,096 positions of Llama 3's vocabulary)."""
    if not compiled or not hasattr(loss_fn, "compute_cross_entropy"):
        yield
        return
    loss_fn.compute_cross_entropy = lambda logits, labels, normalize=True: _CrossEntropyKeepingLogits.apply(
        logits, labels, loss_fn.ignore_index)
    try:
        yield
    finally:
        del loss_fn.compute_cross_entropy


def _leaves(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """A plain tensor, or the inner tensors of a subclass (NF4: quantized data and scalers)."""
    if is_traceable_wrapper_subclass(tensor):
        attrs, _ = tensor.__tensor_flatten__()
        for attr in attrs:
            yield from _leaves(getattr(tensor, attr))
    else:
        yield tensor


def _storage_nbytes(storage) -> int:
    n = storage.nbytes()
    if isinstance(n, torch.SymInt):  # a size that depends on data (a boolean mask's count): its hint, or 0
        hint = n.node.hint
        return int(hint) if hint is not None else 0
    return int(n)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (subclasses through their inner tensors)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        for leaf in _leaves(tensor):
            storage = leaf.untyped_storage()
            if id(storage) not in seen:
                seen.add(id(storage))
                total += _storage_nbytes(storage)
    return total


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create inside this mode and that are still alive: ``current``
    and its ``peak``. A view or an in-place op creates nothing (the op's schema says its result
    aliases an input); a freed storage is subtracted when it dies (a weak reference's callback)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat = tree_flatten(out)[0]
        for i, tensor in enumerate(flat):
            if not isinstance(tensor, torch.Tensor):
                continue
            if i < len(returns) and returns[i].alias_info is not None:
                continue  # a view of, or an in-place write to, an existing tensor
            for leaf in _leaves(tensor):
                storage = leaf.untyped_storage()
                key = id(storage)
                if key in self._live:
                    continue
                nbytes = _storage_nbytes(storage)
                self._live[key] = nbytes
                self.current += nbytes
                weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


def bnb_8bit_state_bytes(params: Iterable[torch.Tensor]) -> int:
    """What bitsandbytes' 8-bit blockwise Adam(W) (``PagedAdamW8bit``, ``AdamW8bit``) allocates:
    per tensor of at least 4,096 elements two uint8 states and one fp32 absmax per 256-element
    block of each; smaller tensors keep two fp32 states. The shared quantization maps (2 x 256
    fp32) are left out. Paged state lives in CUDA unified memory, which can be paged out to the
    CPU under pressure; counted here as if on the GPU."""
    total = 0
    for p in params:
        n = p.numel()
        total += 8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
    return total


def is_bnb_8bit(optimizer_component: str) -> bool:
    return optimizer_component.startswith("bitsandbytes.") and "8bit" in optimizer_component


@dataclass
class Estimate:
    """One step's (or one answering batch's) memory by category in bytes, its FLOPs and tokens."""

    name: str
    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    step_temporaries: int = 0
    flops: float = 0.0  # per optimizer step (training) or per answered batch
    tokens: int = 0  # tokens those FLOPs process
    notes: List[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """Steady state: parameters, gradients and optimizer state all live while a micro-batch
        runs (gradients accumulate) or the optimizer steps, whichever needs more on top."""
        return (self.parameters + self.gradients + self.optimizer_state
                + max(self.activations, self.step_temporaries))

    def needs_gib(self, allowance_gib: float = CUDA_ALLOWANCE_GIB) -> float:
        return self.peak / GiB + allowance_gib

    def tokens_per_second(self, gpu: str) -> Optional[float]:
        if not self.flops or not self.tokens:
            return None
        return assumed_mfu() * GPU_PEAK_TFLOPS[gpu] * 1e12 / (self.flops / self.tokens)

    def as_dict(self, cards_gb=CARDS_GB, allowance_gib: float = CUDA_ALLOWANCE_GIB) -> Dict[str, Any]:
        gib = lambda b: round(b / GiB, 3)  # noqa: E731
        return {
            "name": self.name, "peak_gib": gib(self.peak), "parameters_gib": gib(self.parameters),
            "gradients_gib": gib(self.gradients), "optimizer_state_gib": gib(self.optimizer_state),
            "activations_gib": gib(self.activations), "step_temporaries_gib": gib(self.step_temporaries),
            "cuda_allowance_gib": allowance_gib, "needs_gib": round(self.needs_gib(allowance_gib), 3),
            "flops": self.flops, "tokens": self.tokens,
            "tokens_per_s": {gpu: (round(t) if (t := self.tokens_per_second(gpu)) else None)
                             for gpu in GPU_PEAK_TFLOPS},
            "fits": {f"{c}GB": self.needs_gib(allowance_gib) <= c for c in cards_gb},
            "notes": list(self.notes),
        }


def count_flops(fn: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def measure(fn: Callable[[], Any]) -> int:
    """Peak bytes created and alive while ``fn`` runs (beyond what existed before)."""
    with LiveBytes() as live:
        fn()
    return live.peak


def gradient_bytes(params: Iterable[torch.Tensor]) -> int:
    return storage_bytes(p.grad for p in params if p.grad is not None)


def format_table(estimates: List[Estimate], cards_gb=CARDS_GB, allowance_gib: float = CUDA_ALLOWANCE_GIB,
                 gpu: str = "rtx4090") -> str:
    """A Markdown table: memory by category (GiB), FLOPs, tokens/s on ``gpu``, and the verdicts."""
    head = ["what", "params", "grads", "optim", "activations", "step temp", "peak", f"+{allowance_gib:g} CUDA",
            "TFLOP/step", f"tokens/s {gpu}"] + [f"{c} GB" for c in cards_gb]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in estimates:
        tps = e.tokens_per_second(gpu)
        row = [e.name] + [f"{b / GiB:.2f}" for b in (e.parameters, e.gradients, e.optimizer_state, e.activations,
                                                       e.step_temporaries, e.peak)]
        row += [f"{e.needs_gib(allowance_gib):.2f}", f"{e.flops / 1e12:.1f}" if e.flops else "",
                f"{tps:,.0f}" if tps else ""]
        row += ["fits" if e.needs_gib(allowance_gib) <= c else "no" for c in cards_gb]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- building without data


class ShapesOnlyTokenizer:
    """What the pause spec and ``pause_init`` ask of a tokenizer, without its file: ``reserved``
    pause names get placeholder ids (100, 101, ...; the memory is the same), ``copy`` a token id 0."""

    class _AnyName(dict):
        def __contains__(self, name) -> bool:
            return True

        def __missing__(self, name):
            self[name] = 100 + len(self)
            return self[name]

    def __init__(self) -> None:
        self.special_tokens = self._AnyName()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        return [0]


class fewer_layers:
    """Within: the config's model builder makes only ``n`` decoder layers (None: all of them).

    torchtune's model builders (``qlora_llama3_8b`` ...) pass ``num_layers`` to a component builder
    (``lora_llama3`` ...) found in their module's globals; that one is swapped for the duration."""

    def __init__(self, cfg_model: Any, n: Optional[int]) -> None:
        self._n, self._swapped = n, []
        if n is None:
            return
        from torchtune.config._utils import _get_component_from_path

        builder = _get_component_from_path(str(cfg_model._component_))
        while hasattr(builder, "func"):  # functools.partial
            builder = builder.func
        self._globals = builder.__globals__

    def __enter__(self):
        if self._n is None:
            return self
        for name, fn in list(self._globals.items()):
            if callable(fn) and not isinstance(fn, type) and "num_layers" in _parameters(fn):
                self._swapped.append((name, fn))
                self._globals[name] = _with_num_layers(fn, self._n)
        if not self._swapped:
            raise ValueError("layers: this model builder takes no num_layers anywhere; leave layers out")
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._swapped:
            self._globals[name] = fn


def _parameters(fn) -> tuple:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


def _with_num_layers(fn, n: int):
    def call(*args, **kwargs):
        kwargs["num_layers"] = n
        return fn(*args, **kwargs)
    return call
