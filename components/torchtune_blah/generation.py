"""Batched greedy decoding with a KV cache and llama-squad's stop rule.

llama-squad decodes one question at a time and stops after the first token whose
text contains ``}`` (the end of the JSON answer). Here a batch of prompts is
left-padded, pre-filled once into torchtune's KV cache, and decoded greedily,
one token per step for the whole batch, until every row has stopped (at a
``}`` token or end-of-turn) or ``max_new_tokens``. Pause ids are masked out of
every step's logits, so they are never generated.

While decoding, ``probe`` records each row's probability of one chosen token at
one chosen step: evaluation uses it to read the model's probability of
abstaining right where the answer value starts. With ``probe_mask`` that token is
also forbidden at that step, so the row decodes its best non-abstention span. Each
row's log-probability of what it wrote from that step on is summed (the probability of the
value it gave, and of not abstaining: the null-score rule of calibrated abstention reads it,
and so does every answer's ``confidence``).

The prompts of a batch start alike (system prompt and instructions: about half of a SQuAD
prompt). ``share_prefix`` computes that common prefix once, at batch size 1, copies its keys
and values into every row's cache, and pre-fills only the rest of each row (laid out as
``prefix | padding | rest``, the padding masked and skipped by the position ids, so every row
sees exactly the positions it would see alone).

Decoding reads one position's logits per row; ``torchtune_patches.unembed_last_position`` keeps the pre-fill from
projecting every prompt position onto the vocabulary (and upcasting those logits to fp32, as
torchtune's decoder does) only to read the last.
"""

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import KVCache
from torchtune.modules.common_utils import local_kv_cache

from torchtune_blah.chat_format import chat_format
from torchtune_blah.pause import NO_PAUSE, PauseTokens, mask_pause_logits
from torchtune_blah.torchtune_patches import single_query_attention, unembed_last_position


def stop_token_ids(tokenizer, extra: Optional[Iterable[int]] = None) -> Set[int]:
    """Every id whose text contains ``}``, plus ``extra`` (default: the chat format's end ids,
    end-of-turn and end-of-text). Works for any tokenizer with a known chat format."""
    fmt = chat_format(tokenizer)
    ids = {i for i, text in enumerate(fmt.token_texts()) if "}" in text}
    return ids | set(fmt.end_ids if extra is None else extra)


@dataclass
class Generation:
    tokens: List[int]  # generated ids, up to and including the stop token
    stopped: bool  # a stop token was generated (else max_new_tokens ran out)
    probe_prob: Optional[float] = None
    probe_argmax: bool = False  # the probed token was the most likely one at its step (greedy would write it)
    # Sums of log P(token) (the unmasked distribution) of the tokens written: from the probe step on
    # (the answer value and what closes it), and of the whole reply.
    span_logprob: float = 0.0
    reply_logprob: float = 0.0


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Set[int],
    max_new_tokens: int,
    pause: PauseTokens = NO_PAUSE,
    use_cache: bool = True,
    probe: Optional[Tuple[int, Union[int, Tuple[int, ...]]]] = None,
    probe_mask: bool = False,
    on_token: Optional[Callable[[int, int], None]] = None,
    share_prefix: bool = True,
) -> List[Generation]:
    """Greedy continuations of ``prompts`` (lists of ids), batched with left padding.

    ``use_cache=False`` recomputes the whole sequence at each step, one prompt at a
    time (llama-squad's way; kept for the benchmark and for checking the cache).
    ``probe=(step, token_id)``: record ``P(token_id)`` at generated position ``step`` (a
    tuple of ids: their summed probability); ``probe_mask=True`` also forbids those ids there
    so the row writes its best other continuation. Every row's log-probability of what it
    wrote is summed from ``step`` on (``span_logprob``) and over the whole reply (``reply_logprob``),
    under the unmasked distribution.
    ``on_token(row, token_id)`` is called for every generated token as it comes (streaming).
    ``share_prefix``: pre-fill the prompts' common prefix once (module docstring).
    """
    if not use_cache:
        return [_generate_one_without_cache(model, p, stop_ids, max_new_tokens, pause, probe, probe_mask,
                                            (lambda t, row=row: on_token(row, t)) if on_token else None)
                for row, p in enumerate(prompts)]
    device = next(model.parameters()).device
    batch = len(prompts)
    shared = common_prefix_length(prompts) if share_prefix and batch > 1 else 0
    prompt_len = max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    tokens = torch.full((batch, prompt_len), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((batch, total), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # [shared prefix | left padding | the row's rest]
        tail = len(prompt) - shared
        tokens[row, :shared] = torch.tensor(list(prompt[:shared]), dtype=torch.long, device=device)
        tokens[row, prompt_len - tail:] = torch.tensor(list(prompt[shared:]), dtype=torch.long, device=device)
        real[row, :shared] = True
        real[row, prompt_len - tail:] = True
    masks = get_causal_mask_from_padding_mask(real, target_seq_len=total)
    positions = get_position_ids_from_padding_mask(real)
    stop = torch.tensor(sorted(stop_ids), device=device)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    prefix_kv = []
    if shared:  # once, at batch size 1
        with local_kv_cache(model, batch_size=1, device=device, dtype=dtype, decoder_max_seq_len=shared), \
                unembed_last_position(model):
            model(tokens[:1, :shared], mask=masks[:1, :shared, :shared], input_pos=positions[:1, :shared])
            prefix_kv = [(c.k_cache, c.v_cache) for c in kv_caches(model)]
    out = [Generation(tokens=[], stopped=False) for _ in prompts]
    with local_kv_cache(model, batch_size=batch, device=device, dtype=dtype, decoder_max_seq_len=total), \
            unembed_last_position(model), single_query_attention(model):
        fill_prefix(model, prefix_kv, shared)
        logits = last_logits(model(tokens[:, shared:], mask=masks[:, shared:prompt_len],
                                   input_pos=positions[:, shared:prompt_len]))
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_ids = _pick(logits, pause, step, probe, probe_mask, out, done)
            for row in torch.nonzero(~done).flatten().tolist():
                out[row].tokens.append(int(next_ids[row]))
                if on_token is not None:
                    on_token(row, int(next_ids[row]))
            newly_stopped = torch.isin(next_ids, stop) & ~done
            for row in torch.nonzero(newly_stopped).flatten().tolist():
                out[row].stopped = True
            done |= newly_stopped
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = prompt_len + step
            logits = last_logits(model(next_ids[:, None], mask=masks[:, pos:pos + 1], input_pos=positions[:, pos:pos + 1]))
    return out


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading ids every prompt shares, leaving each at least one id of its own."""
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def kv_caches(model: nn.Module) -> List[KVCache]:
    return [m for m in model.modules() if isinstance(m, KVCache)]


def fill_prefix(model: nn.Module, prefix_kv: Sequence[Tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
    """Copy keys and values computed at batch size 1 (``prefix_kv``, one pair per layer) into the
    first ``length`` positions of every row of the model's caches, and move the caches past them."""
    for cache, (k, v) in zip(kv_caches(model), prefix_kv):
        cache.k_cache[:, :, :length] = k
        cache.v_cache[:, :, :length] = v
        cache.cache_pos.add_(length)


def last_logits(output) -> torch.Tensor:
    """Last position's logits; a model set up for chunked loss returns a list of chunks."""
    return (output[-1] if isinstance(output, list) else output)[:, -1]


def _pick(logits, pause, step, probe, probe_mask, out, done):
    logits = logits.float()
    mask_pause_logits(logits, pause)
    # The log-probabilities of what is written are read under the model's own (unmasked)
    # distribution, also at the probe step where ``probe_mask`` forbids the probed ids.
    log_probs = torch.log_softmax(logits, dim=-1)
    if probe is not None and step == probe[0]:
        argmax = logits.argmax(dim=-1)
        ids = [probe[1]] if isinstance(probe[1], int) else list(probe[1])
        probs = log_probs.exp()
        probs = probs[:, ids[0]] if len(ids) == 1 else probs[:, ids].sum(dim=-1)
        for row, p in enumerate(probs.tolist()):
            if not bool(done[row]):
                out[row].probe_prob = p
                out[row].probe_argmax = int(argmax[row]) in ids
        if probe_mask:
            logits[:, ids] = float("-inf")
    next_ids = logits.argmax(dim=-1)
    from_probe = probe is not None and step >= probe[0]
    for row, lp in enumerate(log_probs.gather(1, next_ids[:, None]).flatten().tolist()):
        if not bool(done[row]):
            out[row].reply_logprob += lp
            if from_probe:
                out[row].span_logprob += lp
    return next_ids


def _generate_one_without_cache(model, prompt, stop_ids, max_new_tokens, pause, probe, probe_mask,
                                on_token=None) -> Generation:
    device = next(model.parameters()).device
    tokens = torch.tensor([list(prompt)], device=device)
    out = Generation(tokens=[], stopped=False)
    done = torch.zeros(1, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = last_logits(model(tokens))
        next_id = _pick(logits, pause, step, probe, probe_mask, [out], done)
        out.tokens.append(int(next_id))
        if on_token is not None:
            on_token(int(next_id))
        tokens = torch.cat([tokens, next_id[:, None]], dim=1)
        if int(next_id) in stop_ids:
            out.stopped = True
            break
    return out
