"""The embed phase without a backward pass through the prompt.

In the embed phase only the pause rows train, and attention is causal: no position before the
first pause id can depend on them. So the prompt (system, instructions, context, question: about
350 of 375 tokens of a SQuAD example) needs a forward pass but no autograd; its keys and values go
into a KV cache, and only the positions from the first pause id on (pause ids and reply) run with
autograd on top of it. The gradients of the pause rows are those of the full pass
(``tests/test_prompt_prefix.py``); activation memory scales with the reply, not the prompt.

In a batch the cut is the earliest first pause id of its rows (right padding, as torchtune's
collate pads): the rows whose prompts are longer run a few prompt positions with autograd, which
gives them zero gradient, as in the full pass. What all rows share from the start (the system
prompt and instructions) runs once, at batch size 1, its keys and values copied into every row.
"""

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torchtune.modules.common_utils import delete_kv_caches

from torchtune_blah.generation import common_prefix_length, fill_prefix, kv_caches
from torchtune_blah.pause import PauseTokens
from torchtune_blah.torchtune_patches import prefix_kv_caches


def first_pause_position(tokens: torch.Tensor, pause: PauseTokens) -> int:
    """The earliest position of a pause id over the rows of ``tokens`` ([b, s]); 0 when a row has none."""
    if not pause.ids:
        return 0
    is_pause = torch.isin(tokens, torch.tensor(pause.ids, device=tokens.device))
    if not bool(is_pause.any(dim=1).all()):
        return 0
    return int(is_pause.to(torch.int8).argmax(dim=1).min())


def _layers(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
    """The decoder layers over ``tokens``, filling the caches; no output projection (nobody reads it)."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=positions)


@contextmanager
def prompt_cut(model: nn.Module, tokens: torch.Tensor, start: int,
               shared: Optional[int] = None) -> Iterator[Optional[Callable[[], Any]]]:
    """Within: positions ``:start`` of ``tokens`` have run without autograd (and were never
    unembedded), their keys and values stand in every attention layer; yields a function that
    runs positions ``start:`` on top of them (logits, or the chunks of a chunked-output model).
    Keep the backward pass inside (activation checkpointing recomputes layers there). Yields None
    for ``start <= 0``: run the model as usual. ``shared``: how many leading positions all rows
    share (None: read off the tokens; blah_estimate's tokens have no data to read)."""
    if start <= 0:
        yield None
        return
    batch, length = tokens.shape
    device = tokens.device
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device)).expand(batch, length, length)
    positions = torch.arange(length, device=device).expand(batch, length)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    # The rows' common beginning (the system prompt and instructions) runs once, at batch size 1.
    if shared is None:
        shared = common_prefix_length(tokens[:, :start].tolist()) if batch > 1 else 0
    shared = min(shared, start - 1) if batch > 1 else 0
    shared_kv = []
    if shared:
        with device:
            model.setup_caches(1, dtype, decoder_max_seq_len=shared)
        try:
            with torch.no_grad():
                _layers(model, tokens[:1, :shared], mask[:1, :shared, :shared], positions[:1, :shared])
            shared_kv = [(c.k_cache, c.v_cache) for c in kv_caches(model)]
        finally:
            delete_kv_caches(model)
    with device:
        model.setup_caches(batch, dtype, decoder_max_seq_len=start)
    try:
        fill_prefix(model, shared_kv, shared)
        with torch.no_grad():
            _layers(model, tokens[:, shared:start], mask[:, shared:start, :start], positions[:, shared:start])
        prefix_kv_caches(model)  # (autograd runs on top of the prompt's keys and values)
        yield lambda: model(tokens[:, start:], mask=mask[:, start:], input_pos=positions[:, start:])
    finally:
        delete_kv_caches(model)
