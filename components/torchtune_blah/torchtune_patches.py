"""Everything we change inside torchtune's objects, in one place, each change named.

torchtune 0.6.1 is the last release (torchtune is no longer developed) and these patches were
written against its ``TransformerDecoder`` and ``KVCache``. Each is applied to an instance (never
to the class: other models in the process are untouched), only after an ``isinstance`` check,
and only on the torchtune version it was written for: on another version it stops with an error
that says which patch and which version, instead of changing something it does not know.

- ``contiguous_output_chunks``: ``chunked_output`` with each chunk made contiguous before the
  output projection (CEWithChunkedOutputLoss; 20x faster on a CPU at batch 4: why, below).
- ``unembed_last_position``: ``unembed`` of the last position only, while answering.
- ``unembed_positions``: ``unembed`` of the positions the loss is taken on only, while training.
- ``rms_norm_fp32_weight``: torchtune's ``RMSNorm`` with its weight in fp32 like its input, so
  that torch takes its fused kernel (5x faster on a CPU, the same output).
- ``single_query_attention``: a decoding step's attention (one query per row, bf16, CPU) as two
  matrix products instead of torch's CPU flash kernel, while answering.
- ``prefix_kv_caches``: each attention layer's ``kv_cache`` replaced by a prefix that autograd
  can run on top of (the embed phase's prompt cut, ``torchtune_blah.prompt_prefix``).
"""

from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, List, Tuple, Union

import torch
from torch import nn

WRITTEN_FOR = "0.6.1"


def check_torchtune(patch: str) -> None:
    """Refuse to patch a torchtune other than the one ``patch`` was written for."""
    import torchtune

    version = str(getattr(torchtune, "__version__", "unknown")).split("+")[0]
    if version != WRITTEN_FOR:
        raise RuntimeError(f"torchtune_blah's patch {patch!r} was written for torchtune {WRITTEN_FOR}'s internals; "
                           f"this is torchtune {version}: install torchtune=={WRITTEN_FOR} (its last release)")


def _decoder(model: nn.Module, patch: str):
    from torchtune.modules import TransformerDecoder

    check_torchtune(patch)
    if not isinstance(model, TransformerDecoder):
        raise TypeError(f"{patch}: expects a torchtune TransformerDecoder, got {type(model).__name__}")
    return model


def uses_chunked_output(loss_fn: Any) -> bool:
    """The loss takes the logits in chunks (torchtune's ``CEWithChunkedOutputLoss``)."""
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    return isinstance(loss_fn, CEWithChunkedOutputLoss)


def contiguous_output_chunks(model: nn.Module, num_chunks: int) -> None:
    """torchtune's ``model.set_num_output_chunks``, with each chunk made contiguous before the
    output projection.

    torchtune splits the last hidden state [b, s, d] along s; for b > 1 each chunk is a strided
    view, which matmul cannot fold into one [b*c, d] matrix, so it runs a batched matmul over the
    output weight broadcast to [b, d, vocab], and a CPU copies that broadcast weight first (4 x 576
    x 49,152 numbers per chunk on SmolLM2 at batch 4; forward and backward, bf16, 2 CPU cores: 1.34 s
    instead of 0.065 s for 44 positions, 1.53 s instead of 0.26 s for 366, ``python
    benchmarks/output_chunks.py``). A contiguous chunk costs a copy of b x c x d numbers and gives the
    same logits. torchtune 0.6.1's own recipes pay the copy.
    """
    model = _decoder(model, "contiguous_output_chunks")
    model.set_num_output_chunks(num_chunks)

    @torch.compiler.disable  # as torchtune's chunked_output
    def chunked_output(last_hidden_state: torch.Tensor) -> list:
        return [model.output(chunk.contiguous()) for chunk in last_hidden_state.chunk(model.num_output_chunks, dim=1)]

    model.chunked_output = chunked_output  # an instance attribute: nothing enters the state dict


@contextmanager
def unembed_last_position(model: nn.Module) -> Iterator[None]:
    """Within: the model unembeds only the last position of its input (the output's shape is [b, 1,
    vocab], or chunks of it). Without it a pre-fill of 200 positions makes 200 x vocab fp32 logits
    per row (SmolLM2: 39 MB) to read one row of them."""
    from torchtune.modules import TransformerDecoder

    if not isinstance(model, TransformerDecoder):  # (another model: nothing to narrow, run it as it is)
        yield
        return
    check_torchtune("unembed_last_position")
    unembed = model.unembed  # TransformerDecoder.unembed: final norm + output projection
    model.unembed = lambda h: unembed(h[:, -1:].contiguous())  # contiguous: see contiguous_output_chunks
    try:
        yield
    finally:
        del model.unembed  # the class's method again


@contextmanager
def unembed_positions(model: nn.Module, keep: Union[torch.Tensor, slice]) -> Iterator[None]:
    """Within: the model unembeds (final norm + output projection) only the positions where ``keep``
    ([b, s] bool, s the positions the forward returns) is true, gathered into one row: the output is
    [1, n, vocab], or chunks of it, for the n kept positions in row-major order (``labels[keep]``).
    A ``slice`` keeps the same positions of every row (no data-dependent shape, for fake tensors).

    The loss is taken on the reply only (~25 of ~375 positions in the SmolLM2 demo's batches);
    unembedding every position costs the output projection and its backward for all of them
    (49,152 x 576 on SmolLM2: a fifth of the forward; 128,256 x 4,096 on Llama 3 8B), and a [b, s,
    vocab] fp32 logits tensor (Llama 3 8B at 4,096 tokens: 2 GiB per sequence) that the loss
    reads only ~7% of. The norm is per position, so the kept positions' logits are the same."""
    model = _decoder(model, "unembed_positions")
    unembed = model.unembed
    if isinstance(keep, slice):  # the same positions in every row (blah_estimate's fake batches)
        model.unembed = lambda h: unembed(h[:, keep].reshape(1, -1, h.shape[-1]))
    else:
        model.unembed = lambda h: unembed(h[keep].unsqueeze(0))  # a gather: contiguous, one row
    try:
        yield
    finally:
        del model.unembed  # the class's method again


def rms_norm_fp32_weight(model: nn.Module) -> None:
    """Every torchtune ``RMSNorm`` of ``model`` calls ``F.rms_norm`` with its weight cast to fp32.

    torchtune 0.6.1's ``RMSNorm.forward`` normalises ``x.float()`` with the weight in the model's
    dtype; in bf16 the dtypes differ, and torch warns "Mismatch dtype between input and weight ...
    Cannot dispatch to fused implementation" and takes the composite path. The composite path
    multiplies by the weight in fp32 anyway (type promotion), so the result is the same to the bit;
    measured on this 2-core CPU: 2.49 ms -> 0.48 ms for [8, 191, 576], 0.074 -> 0.023 ms for a
    decoding step's [8, 1, 576] (61 norms per SmolLM2 forward). In fp32 nothing changes."""
    import torch.nn.functional as F
    from torchtune.modules import RMSNorm

    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    if norms:
        check_torchtune("rms_norm_fp32_weight")

    def forward(norm, x):
        return F.rms_norm(x.float(), normalized_shape=norm.normalized_shape, weight=norm.scale.float(),
                          eps=norm.eps).to(x.dtype)

    for m in norms:
        m.forward = partial(forward, m)  # an instance attribute: nothing enters the state dict


@contextmanager
def single_query_attention(model: nn.Module) -> Iterator[None]:
    """Within: every attention call with one query position per row (a decoding step), in bf16/fp16
    on a CPU, computes softmax(q k^T / sqrt(d) + mask) v as two matrix products with the softmax in
    fp32; other calls (pre-fill, training, fp32, GPUs) go to torchtune's SDPA call as before.

    Why: torch's CPU flash-attention kernel is slow for a single bf16 query. One SmolLM2 decoding
    step at batch 8 over a 418-position cache: 1.75 ms per layer through SDPA, 0.39 ms as two
    matmuls (fp32: 0.44 ms through SDPA, so fp32 is left alone); SDPA was 84 of the step's 130 ms.
    For a pre-fill (191 queries) the kernel is the faster one (14 ms vs 30 ms). The two differ by
    bf16 rounding (max 0.002 on unit-normal inputs, against 0.001 for the kernel, both vs fp32)."""
    from torchtune.modules import MultiHeadAttention

    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if layers:
        check_torchtune("single_query_attention")
    originals = [m._attention_call for m in layers]  # (torchtune sets it per instance, in __init__)

    def attention(q, k, v, mask, dropout_p, is_causal, sdpa):
        if q.shape[-2] != 1 or q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16) or dropout_p:
            return sdpa(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [b, h, 1, s]
        if mask is not None:  # torchtune's [b, 1, s]: True (or 0.0) where a position may be attended
            mask = mask[:, None]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    for m, sdpa in zip(layers, originals):
        m._attention_call = partial(attention, sdpa=sdpa)
    try:
        yield
    finally:
        for m, sdpa in zip(layers, originals):
            m._attention_call = sdpa


class PrefixKV(nn.Module):
    """Stands in for an attention layer's ``KVCache`` in the autograd pass: the prompt's keys and
    values (computed without autograd) in front of the new ones, concatenated, not written in
    place (a ``KVCache`` writes through an index it then moves on, which autograd refuses)."""

    def __init__(self, k_prefix: torch.Tensor, v_prefix: torch.Tensor):
        super().__init__()
        self.k_prefix, self.v_prefix = k_prefix, v_prefix

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.k_prefix, k], dim=2), torch.cat([self.v_prefix, v], dim=2)


def prefix_kv_caches(model: nn.Module) -> List[nn.Module]:
    """Replace every attention layer's filled ``KVCache`` by a ``PrefixKV`` holding its keys and
    values (torchtune's ``delete_kv_caches`` removes them afterwards); returns the layers changed."""
    from torchtune.modules import KVCache

    check_torchtune("prefix_kv_caches")
    changed = []
    for module in model.modules():
        if isinstance(getattr(module, "kv_cache", None), KVCache):
            module.kv_cache = PrefixKV(module.kv_cache.k_cache, module.kv_cache.v_cache)
            changed.append(module)
    return changed
