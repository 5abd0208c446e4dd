"""Pause ("reasoning", ``<blah>``) tokens: learnable input embeddings placed between
question and answer. (The whole method's new part in one file, on purpose: spec, embedding
module, files and logit masking are read together.)

The method in three pieces:

- ``PauseTokens`` says which token ids are pause tokens. ``mode="append"`` gives
  them ids past the model's embedding table (``vocab_size .. vocab_size+n-1``,
  llama-squad's way, works for any model); ``mode="reserved"`` reuses special tokens the
  base model never trained (Llama 3's ``<|reserved_special_token_K|>``), so the
  vocabulary, tokenizer and exported checkpoints stay standard.
- ``PauseEmbedding`` wraps a decoder's ``tok_embeddings``: the base table stays
  frozen and untouched, a separate small ``(rows, dim)`` parameter answers for the
  pause ids. Only the *input* side knows them: the output projection (tied or not)
  keeps using the base table, so the model cannot emit an ``append`` id, and
  ``mask_pause_logits`` stops generation from emitting a ``reserved`` one.
- ``save_pause_embeddings`` / ``load_pause_embeddings`` keep the pause rows in
  their own ``pause_embeddings.safetensors`` (the model's state-dict keys do not
  change, so torchtune's checkpointers keep loading the base checkpoint).
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_true

from torchtune_blah.checkpointing import atomic_write
from torchtune_blah.run_dir import PAUSE_EMBEDDINGS_FILE

PAUSE_MODES = ("append", "reserved")
INIT_METHODS = ("mean", "normal", "copy")
PAUSE_PARAM = "tok_embeddings.pause_weight"  # the model's one pause parameter, by its state-dict name
_TENSOR_KEY = "pause_embeddings"
_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class PauseTokens:
    """Which ids are pause tokens and how they appear in a sequence.

    Build it with ``pause_tokens(...)`` (config-friendly, resolves reserved names
    through the tokenizer) rather than directly.

    Attributes:
        ids: one token id per trainable embedding row.
        names: one display name per row (``<blah_0>`` ... or ``<blah>``); pause ids
            are never decoded through the tokenizer, whose text for an append id
            may be an unrelated special token (``<|image|>`` at 128256).
        num: how many pause tokens stand in each assistant turn.
        mode: ``"append"`` or ``"reserved"``.
        vocab_size: rows of the model's base embedding table (append mode), or None.
    """

    ids: Tuple[int, ...]
    names: Tuple[str, ...]
    num: int
    mode: str
    vocab_size: Optional[int] = None

    @property
    def distinct(self) -> bool:
        return len(self.ids) == self.num

    @property
    def sequence(self) -> List[int]:
        """The ids inserted after the assistant header: ``num`` of them."""
        return list(self.ids) if self.distinct else list(self.ids) * self.num

    def name_of(self, token_id: int) -> Optional[str]:
        """Display name of a pause id, or None for any other id."""
        try:
            return self.names[self.ids.index(token_id)]
        except ValueError:
            return None

    def __len__(self) -> int:
        return self.num


# "No pause tokens" has one spelling: num == 0. In configs `pause_tokens.num: 0`; in code a
# PauseTokens with num == 0 (this one, or pause_tokens(num=0)), never None.
NO_PAUSE = PauseTokens(ids=(), names=(), num=0, mode="append")


def pause_tokens(
    num: int = 5,
    distinct: bool = True,
    mode: str = "append",
    vocab_size: Optional[int] = None,
    reserved_tokens: Optional[Sequence[str]] = None,
    first_reserved: int = 10,
    tokenizer: Any = None,
) -> PauseTokens:
    """Build the pause-token spec (the ``pause_tokens`` block of our configs).

    Args:
        num: pause tokens per assistant turn (llama-squad: 5). 0 disables the method
            (plain answer-only SFT).
        distinct: ``<blah_0>..<blah_{n-1}>`` (True, llama-squad's default) or one
            ``<blah>`` repeated ``num`` times (False: one trainable row).
        mode: ``"append"``: ids ``vocab_size .. vocab_size+rows-1``, past the base
            table. ``"reserved"``: reuse the tokenizer's special tokens
            ``reserved_tokens`` (default ``<|reserved_special_token_{first_reserved+i}|>``).
        vocab_size: rows of the model's token-embedding table; required for
            ``append`` (128256 for Llama 3/3.1/3.2).
        reserved_tokens: special-token names to reuse in ``reserved`` mode.
        first_reserved: first K of the default reserved names. Llama 3.1+ gave
            meanings to some low-numbered reserved slots; 10 stays clear of them.
        tokenizer: a torchtune tokenizer with ``special_tokens``; needed for ``reserved``.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"pause_tokens.num must be an integer >= 0, got {num!r}")
    if mode not in PAUSE_MODES:
        raise ValueError(f"pause_tokens.mode must be one of {PAUSE_MODES}, got {mode!r}")
    rows = 0 if num == 0 else (num if distinct else 1)
    names = tuple(f"<blah_{i}>" for i in range(rows)) if distinct else ("<blah>",) * rows

    if mode == "append":
        if rows == 0:
            return PauseTokens(ids=(), names=(), num=0, mode=mode, vocab_size=vocab_size)
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError(
                "pause_tokens.vocab_size is required in mode 'append': set it to the number of rows "
                "of the model's token embedding table (128256 for Llama 3 / 3.1 / 3.2)."
            )
        ids = tuple(int(vocab_size) + i for i in range(rows))
        return PauseTokens(ids=ids, names=names, num=num, mode=mode, vocab_size=int(vocab_size))

    # reserved
    if reserved_tokens is None:
        reserved_tokens = [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(rows)]
    reserved_tokens = list(reserved_tokens)
    if len(reserved_tokens) != rows:
        raise ValueError(
            f"pause_tokens.reserved_tokens has {len(reserved_tokens)} names but {rows} are needed "
            f"(num={num}, distinct={distinct})."
        )
    if rows and tokenizer is None:
        raise ValueError("pause_tokens in mode 'reserved' needs the tokenizer to look up the reserved token ids.")
    special = getattr(tokenizer, "special_tokens", {}) if rows else {}
    missing = [name for name in reserved_tokens if name not in special]
    if missing:
        raise ValueError(
            f"pause_tokens.reserved_tokens: {missing} are not special tokens of this tokenizer "
            f"({type(tokenizer).__name__}); pick names from tokenizer.special_tokens."
        )
    ids = tuple(int(special[name]) for name in reserved_tokens)
    if len(set(ids)) != len(ids):
        raise ValueError(f"pause_tokens.reserved_tokens must name distinct tokens, got ids {ids}")
    return PauseTokens(ids=ids, names=tuple(reserved_tokens), num=num, mode=mode)


def as_pause_tokens(spec: Union[None, PauseTokens, Mapping[str, Any]], tokenizer: Any = None) -> PauseTokens:
    """Accept a ``PauseTokens``, a config mapping of ``pause_tokens`` arguments (or the typed
    section a recipe's schema makes of it), or None (``NO_PAUSE``)."""
    if isinstance(spec, PauseTokens):
        return spec
    if spec is None:
        return NO_PAUSE
    if dataclasses.is_dataclass(spec):  # (config_schema.PauseTokensSection, as torchtune's instantiate gives it)
        spec = dataclasses.asdict(spec)
    kwargs = {k: v for k, v in dict(spec).items() if k != "_component_"}
    return pause_tokens(**kwargs, tokenizer=tokenizer)


class PauseEmbedding(nn.Module):
    """Token embedding with a separate trainable row per pause id.

    ``weight`` is the base table itself (the same ``Parameter`` object, frozen), so
    the model's state-dict keys and any tied output projection are unchanged.
    ``pause_weight`` (rows x dim) is the only new parameter; it is left out of the
    module's state dict and saved with ``save_pause_embeddings``.

    Forward: one base lookup (pause ids replaced by 0) and an in-place write of the
    few pause rows; nothing is allocated in proportion to the vocabulary.
    """

    def __init__(self, base: nn.Embedding, pause: PauseTokens, init: torch.Tensor):
        super().__init__()
        if init.shape != (len(pause.ids), base.embedding_dim):
            raise ValueError(f"init must have shape {(len(pause.ids), base.embedding_dim)}, got {tuple(init.shape)}")
        self.pause = pause
        self.num_embeddings = base.num_embeddings
        self.embedding_dim = base.embedding_dim
        self.padding_idx = base.padding_idx
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.pause_weight = nn.Parameter(init.detach().clone().to(base.weight.dtype))
        # On the table's device: forward compares them with the tokens (torch.isin), on the GPU. A
        # table on the meta device (FSDP2 builds there) gets CPU ids, which fully_shard moves to the GPU.
        device = base.weight.device if base.weight.device.type != "meta" else torch.device("cpu")
        ids = torch.tensor(pause.ids, dtype=torch.long, device=device)
        sorted_ids, row_of_sorted = torch.sort(ids)
        self.register_buffer("_sorted_ids", sorted_ids, persistent=False)
        self.register_buffer("_row_of_sorted", row_of_sorted, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        is_pause = torch.isin(tokens, self._sorted_ids)
        out = F.embedding(tokens.masked_fill(is_pause, 0), self.weight)
        pause_tokens_here = tokens[is_pause]
        # guard_or_true: on fake tensors (blah_estimate) the count is unknown; on real ones it is the count
        if guard_or_true(pause_tokens_here.numel() != 0):
            rows = self._row_of_sorted[torch.searchsorted(self._sorted_ids, pause_tokens_here)]
            out[is_pause] = self.pause_weight[rows].to(out.dtype)
        return out

    # The base checkpoint's keys stay exactly as they were: no pause_weight in the
    # module's state dict (it has a file of its own).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "pause_weight" in missing_keys:
            missing_keys.remove(prefix + "pause_weight")

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, pause_ids={list(self.pause.ids)}, "
                f"mode={self.pause.mode}, num={self.pause.num}")


def _initial_rows(table: torch.Tensor, rows: int, init: str, init_std: float,
                  init_token: Union[None, int, str], tokenizer: Any) -> torch.Tensor:
    table = table.detach()
    if init == "mean":
        row = table.float().mean(dim=0)
        return row.expand(rows, -1).clone()
    if init == "normal":
        return torch.randn(rows, table.shape[1], device=table.device) * init_std
    if init == "copy":
        token_id = _resolve_token_id(init_token, tokenizer)
        if not 0 <= token_id < table.shape[0]:
            raise ValueError(f"init_token id {token_id} is outside the embedding table ({table.shape[0]} rows)")
        return table[token_id].float().expand(rows, -1).clone()
    raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")


def _resolve_token_id(init_token: Union[None, int, str], tokenizer: Any) -> int:
    if isinstance(init_token, int) and not isinstance(init_token, bool):
        return init_token
    if not isinstance(init_token, str) or not init_token:
        raise ValueError("init='copy' needs init_token: a token id or a text that is exactly one token")
    if tokenizer is None:
        raise ValueError("init_token given as text needs the tokenizer to find its id")
    special = getattr(tokenizer, "special_tokens", {})
    if init_token in special:
        return int(special[init_token])
    ids = tokenizer.encode(init_token, add_bos=False, add_eos=False)
    if len(ids) != 1:
        raise ValueError(f"init_token {init_token!r} is {len(ids)} tokens ({ids}); name a single token")
    return ids[0]


def add_pause_embeddings(
    model: nn.Module,
    pause: PauseTokens,
    init: str = "mean",
    init_std: float = 0.02,
    init_token: Union[None, int, str] = None,
    tokenizer: Any = None,
    table: Optional[torch.Tensor] = None,
) -> Optional[PauseEmbedding]:
    """Give a torchtune ``TransformerDecoder`` trainable pause-token input embeddings.

    Works for separate output projections (Llama 3/3.1 8B) and tied ones (Llama
    3.2 1B/3B, Qwen2.5): a ``TiedLinear`` output is pointed at the new module, whose
    ``weight`` is the base table's own ``Parameter``, so the output side only ever
    sees the base table, also when FSDP2 swaps that parameter for its shards.

    Args:
        model: decoder with a ``tok_embeddings`` ``nn.Embedding``.
        pause: the spec from ``pause_tokens``; with ``num=0`` nothing changes.
        init: ``"mean"`` of the base rows (default), ``"normal"`` (std ``init_std``;
            llama-squad's way) or ``"copy"`` the row of ``init_token``.
        init_token: id, special-token name or one-token text (with ``tokenizer``).
        table: the base table to initialise from, when the model's is not loaded yet
            (a model on the meta device, sharded later by FSDP2).

    Returns:
        The new ``PauseEmbedding`` (now ``model.tok_embeddings``), or None when ``pause.num == 0``.
    """
    if pause.num == 0:
        return None
    base = getattr(model, "tok_embeddings", None)
    if isinstance(base, PauseEmbedding):
        raise ValueError("this model already has pause embeddings")
    if not isinstance(base, nn.Embedding):
        raise TypeError(f"expected model.tok_embeddings to be an nn.Embedding, got {type(base).__name__}")
    vocab = base.num_embeddings
    if pause.mode == "append" and pause.vocab_size != vocab:
        raise ValueError(
            f"pause_tokens.vocab_size={pause.vocab_size} but the model's embedding table has {vocab} rows; "
            f"set pause_tokens.vocab_size={vocab}."
        )
    if pause.mode == "reserved" and max(pause.ids) >= vocab:
        raise ValueError(f"reserved pause ids {list(pause.ids)} do not fit the model's {vocab}-row embedding table")
    rows = _initial_rows(base.weight if table is None else table, len(pause.ids), init, init_std, init_token,
                         tokenizer)
    module = PauseEmbedding(base, pause, rows)
    model.tok_embeddings = module
    output = getattr(model, "output", None)
    if getattr(output, "tied_module", None) is base:  # torchtune's TiedLinear
        output.tied_module = module
    return module


def find_pause_embedding(model: nn.Module) -> Optional[PauseEmbedding]:
    module = getattr(model, "tok_embeddings", None)
    return module if isinstance(module, PauseEmbedding) else None


def mask_pause_logits(logits: torch.Tensor, pause: PauseTokens) -> torch.Tensor:
    """Set the logits of pause ids to -inf, in place, so decoding never picks one.

    ``append`` ids lie past the output projection and need nothing; ``reserved``
    ids are real rows of it and must be masked at every decoding step.
    """
    ids = [i for i in pause.ids if i < logits.shape[-1]]
    if ids:
        logits[..., ids] = float("-inf")
    return logits


def _metadata(pause: PauseTokens, dim: int, base_vocab_size: int) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "mode": pause.mode,
        "num": str(pause.num),
        "distinct": json.dumps(pause.distinct),
        "ids": json.dumps(list(pause.ids)),
        "names": json.dumps(list(pause.names)),
        "dim": str(dim),
        "base_vocab_size": str(base_vocab_size),
    }


def save_pause_embeddings(module: PauseEmbedding, path: str, rows: Optional[torch.Tensor] = None) -> str:
    """Write the pause rows and their metadata to ``path`` (a file or a directory).

    ``rows``: the full rows, when ``module.pause_weight`` holds one rank's shard (FSDP2).

    Atomic: the file is written beside its destination and renamed into place,
    so a crash never leaves a half-written file under the final name.
    """
    from safetensors.torch import save_file

    if os.path.isdir(path):
        path = os.path.join(path, PAUSE_EMBEDDINGS_FILE)
    tensor = (module.pause_weight if rows is None else rows).detach().to("cpu").contiguous()
    metadata = _metadata(module.pause, module.embedding_dim, module.num_embeddings)
    atomic_write(path, lambda tmp: save_file({_TENSOR_KEY: tensor}, tmp, metadata=metadata))
    return path


def read_pause_embeddings(path: str) -> Tuple[torch.Tensor, dict]:
    """Return ``(rows, metadata)`` from a ``pause_embeddings.safetensors`` (file or its directory)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, PAUSE_EMBEDDINGS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no pause embeddings at {path}")
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata() or {})
        if _TENSOR_KEY not in f.keys():
            raise ValueError(f"{path} has no '{_TENSOR_KEY}' tensor; is it a pause_embeddings file?")
        rows = f.get_tensor(_TENSOR_KEY)
    for key in ("mode", "num", "ids", "dim", "base_vocab_size"):
        if key not in metadata:
            raise ValueError(f"{path} lacks metadata '{key}'; it was not written by save_pause_embeddings")
    metadata["num"] = int(metadata["num"])
    metadata["dim"] = int(metadata["dim"])
    metadata["base_vocab_size"] = int(metadata["base_vocab_size"])
    metadata["ids"] = json.loads(metadata["ids"])
    metadata["names"] = json.loads(metadata.get("names", "[]"))
    metadata["distinct"] = json.loads(metadata.get("distinct", "true"))
    return rows, metadata


def pause_tokens_from_metadata(metadata: Mapping[str, Any]) -> PauseTokens:
    """The spec a saved file was trained with (for evaluation from a run directory)."""
    return PauseTokens(
        ids=tuple(metadata["ids"]),
        names=tuple(metadata["names"]),
        num=metadata["num"],
        mode=metadata["mode"],
        vocab_size=metadata["base_vocab_size"] if metadata["mode"] == "append" else None,
    )


def load_pause_embeddings(module: PauseEmbedding, path: str) -> dict:
    """Copy saved pause rows into ``module``; a file for another setup fails clearly."""
    rows, metadata = read_matching_pause_rows(module, path)
    with torch.no_grad():
        module.pause_weight.copy_(rows.to(module.pause_weight.dtype))
    return metadata


def read_matching_pause_rows(module: PauseEmbedding, path: str) -> Tuple[torch.Tensor, dict]:
    """``(rows, metadata)`` from ``path``, checked against ``module``'s pause tokens."""
    rows, metadata = read_pause_embeddings(path)
    expected = {
        "mode": module.pause.mode,
        "num": module.pause.num,
        "ids": list(module.pause.ids),
        "dim": module.embedding_dim,
        "base_vocab_size": module.num_embeddings,
    }
    wrong = [f"{k}: file has {metadata[k]!r}, model has {v!r}" for k, v in expected.items() if metadata[k] != v]
    if wrong or tuple(rows.shape) != tuple(module.pause_weight.shape):
        wrong = wrong or [f"shape: file has {tuple(rows.shape)}, model has {tuple(module.pause_weight.shape)}"]
        raise ValueError(
            f"pause embeddings in {path} do not match this model's pause tokens:\n  " + "\n  ".join(wrong)
            + "\nUse the pause_tokens settings the file was trained with, or train new pause embeddings."
        )
    return rows, metadata
