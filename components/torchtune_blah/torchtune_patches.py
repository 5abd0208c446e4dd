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
- ``prefix_kv_caches``: each attention layer's ``kv_cache`` replaced by a prefix that autograd
  can run on top of (the embed phase's prompt cut, ``torchtune_blah.prompt_prefix``).
"""

from contextlib import contextmanager
from typing import Any, Iterator, List, Tuple

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
def unembed_positions(model: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Within: the model unembeds (final norm + output projection) only the positions where ``keep``
    ([b, s] bool, s the positions the forward returns) is true, gathered into one row: the output is
    [1, n, vocab], or chunks of it, for the n kept positions in row-major order (``labels[keep]``).

    The loss is taken on the reply only (~25 of ~375 positions in the SmolLM2 demo's batches);
    unembedding every position costs the output projection and its backward for all of them
    (49,152 x 576 on SmolLM2: a fifth of the forward; 128,256 x 4,096 on Llama 3 8B), and a [b, s,
    vocab] fp32 logits tensor (Llama 3 8B at 4,096 tokens: 2 GiB per sequence) that the loss
    reads only ~7% of. The norm is per position, so the kept positions' logits are the same."""
    model = _decoder(model, "unembed_positions")
    unembed = model.unembed
    model.unembed = lambda h: unembed(h[keep].unsqueeze(0))  # a gather: contiguous, one row
    try:
        yield
    finally:
        del model.unembed  # the class's method again


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
