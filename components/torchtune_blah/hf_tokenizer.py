"""A run's tokenizer as a Hugging Face ``tokenizer.json`` with the pause tokens in it, and a
chat template that puts them where training put them.

Used by ``blah_export``. Only the ``tokenizers`` library is needed (torchtune depends on it);
transformers is not. Where the tokenizer comes from:

- ChatML (SmolLM2, Qwen2.5): the ``tokenizer.json`` the model ships with (beside
  ``tokenizer.path``, or in the checkpoint directory);
- Llama 3 (torchtune's tiktoken ``Llama3Tokenizer``): the checkpoint directory's
  ``tokenizer.json`` when there is one (``tune download`` leaves it there), else the tiktoken
  file converted the way transformers' ``TikTokenConverter`` converts it.

Either way the result is checked against the run's own tokenizer on real text before any
weights load. Pause tokens become special tokens at the pause ids: appended in ``append``
mode (placeholders fill any gap between the tokenizer and the embedding table, as Qwen2.5's
151,665 tokens vs 151,936 rows), the existing reserved names in ``reserved`` mode.
"""

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from torchtune_blah.chat_format import ChatFormat, chat_format
from torchtune_blah.pause import PauseTokens


class TokenizerExportError(ValueError):
    pass


def placeholder_name(token_id: int) -> str:
    return f"<|blah_unused_{token_id}|>"


def bytes_to_unicode() -> Dict[int, str]:
    # GPT-2's reversible byte <-> printable-character table, as byte-level BPE uses it.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiktoken_to_tokenizers(path: str, pattern: str, special_tokens: Dict[str, int], bos: Optional[str]):
    """A tiktoken BPE file as a ``tokenizers.Tokenizer`` (byte-level BPE, same ids).

    Merges are recovered from the ranks as transformers' ``TikTokenConverter`` does: every
    split of a token into two known pieces, ordered by the merged token's rank.
    """
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks = load_tiktoken_bpe(path)
    to_text = bytes_to_unicode()

    def text(raw: bytes) -> str:
        return "".join(to_text[b] for b in raw)

    vocab = {text(raw): rank for raw, rank in ranks.items()}
    merges = []
    for raw, rank in ranks.items():
        pieces = [(raw[:i], raw[i:]) for i in range(1, len(raw)) if raw[:i] in ranks and raw[i:] in ranks]
        pieces.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(text(left), text(right), rank) for left, right in pieces]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    tokenizer = Tokenizer(models.BPE(vocab, [(a, b) for a, b, _ in merges], fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    if bos is not None:  # as Llama 3's tokenizer.json: plain encodes start with <|begin_of_text|>
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special_tokens[bos])])
    for name, token_id in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if token_id < size:
            raise TokenizerExportError(f"special token {name} has id {token_id}, inside the BPE vocabulary ({size})")
        # ids the tiktoken tokenizer leaves unnamed (torchtune moves <|image|> out of the tiny layout) get placeholders
        tokenizer.add_special_tokens([AddedToken(placeholder_name(i), special=True, normalized=False)
                                      for i in range(size, token_id)])
        tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return tokenizer


def _tokenizer_json_candidates(tokenizer_cfg: Any, checkpoint_dir: Optional[str]) -> List[str]:
    path = str(tokenizer_cfg.get("path") or "")
    candidates = []
    if path.endswith(".json") and os.path.basename(path) == "tokenizer.json":
        candidates.append(path)
    elif path:
        candidates.append(os.path.join(os.path.dirname(path), "tokenizer.json"))
    if checkpoint_dir:
        candidates.append(os.path.join(checkpoint_dir, "tokenizer.json"))
    return candidates


def base_hf_tokenizer(run_tokenizer: Any, tokenizer_cfg: Any, checkpoint_dir: Optional[str], vocab_rows: int):
    """The run's tokenizer as a ``tokenizers.Tokenizer``, before pause tokens; raises
    ``TokenizerExportError`` naming what is missing."""
    from tokenizers import Tokenizer

    fmt = chat_format(run_tokenizer)  # a TypeError for tokenizers without a known chat format
    candidates = [p for p in _tokenizer_json_candidates(tokenizer_cfg, checkpoint_dir) if os.path.isfile(p)]
    if candidates:
        return Tokenizer.from_file(candidates[0]), candidates[0]
    if fmt.name == "llama3" and hasattr(run_tokenizer, "tt_model"):
        encoding = run_tokenizer.tt_model.tt_model
        special = {n: i for n, i in run_tokenizer.special_tokens.items() if i < vocab_rows}
        bos = next((n for n, i in special.items() if i == run_tokenizer.bos_id), None)
        return tiktoken_to_tokenizers(str(tokenizer_cfg.path), encoding._pat_str, special, bos), str(tokenizer_cfg.path)
    raise TokenizerExportError(
        f"tokenizer: the export needs a Hugging Face tokenizer.json for {type(run_tokenizer).__name__}; none at "
        f"{_tokenizer_json_candidates(tokenizer_cfg, checkpoint_dir)}. Put the model's tokenizer.json in the "
        "checkpoint directory (tune download leaves it there).")


def add_pause_tokens(tokenizer: Any, pause: PauseTokens, vocab_rows: int) -> None:
    """Make the pause ids real special tokens of ``tokenizer`` (in place) and check their ids."""
    from tokenizers import AddedToken

    if not pause.ids:
        return
    if pause.mode == "reserved":
        for name, token_id in zip(pause.names, pause.ids):
            if tokenizer.token_to_id(name) != token_id:
                raise TokenizerExportError(f"reserved pause token {name} is id {tokenizer.token_to_id(name)} in the "
                                           f"Hugging Face tokenizer but {token_id} in the run")
        return
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_rows:
        raise TokenizerExportError(f"the tokenizer has {size} tokens but the model's embedding table {vocab_rows} "
                                   "rows: append-mode pause ids would collide with real tokens")
    # Rows the model has but the tokenizer does not name (Qwen2.5): fill them so the pause names land on their ids.
    tokenizer.add_special_tokens([AddedToken(placeholder_name(i), special=True, normalized=False)
                                  for i in range(size, vocab_rows)])
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in pause.names])
    got = [tokenizer.token_to_id(name) for name in pause.names]
    if got != list(pause.ids):
        raise TokenizerExportError(f"pause tokens {list(pause.names)} got ids {got}, expected {list(pause.ids)}")


def check_same_encoding(tokenizer: Any, fmt: ChatFormat, texts: Sequence[str], source: str) -> None:
    """The exported tokenizer must encode text exactly as the run's tokenizer did."""
    for text in texts:
        ours, theirs = fmt.encode(text), tokenizer.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            raise TokenizerExportError(
                f"{source} does not encode like the run's tokenizer ({type(fmt.tokenizer).__name__}): "
                f"{text[:40]!r} -> {theirs[:8]}... vs {ours[:8]}...; export needs the tokenizer the run trained with")


def _literal(text: str) -> str:
    """A Jinja string literal (Jinja reads Python/JSON escapes)."""
    return json.dumps(text)


def chat_template(fmt: ChatFormat, pause_text: str) -> str:
    """A Jinja chat template rendering conversations as training did: pause tokens right after
    every assistant header (and after the generation prompt), other contents trimmed, assistant
    contents as they are."""
    pause = _literal(pause_text)
    if fmt.name == "llama3":
        header = ("'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'",
                  "'<|start_header_id|>assistant<|end_header_id|>\\n\\n'")
        start, end = "{{- bos_token }}\n", "'<|eot_id|>'"
        default_system = ""
    elif fmt.name == "chatml":
        header = ("'<|im_start|>' + message['role'] + '\\n'", "'<|im_start|>assistant\\n'")
        start, end = "", "'<|im_end|>\\n'"
        default_system = ""
        if fmt.default_system_prompt:
            default_system = (
                "{%- if not messages or messages[0]['role'] != 'system' %}\n"
                f"{{{{- '<|im_start|>system\\n' + {_literal(fmt.default_system_prompt)} + '<|im_end|>\\n' }}}}\n"
                "{%- endif %}\n")
    else:
        raise TokenizerExportError(f"no chat template for chat format {fmt.name!r}")
    return (
        f"{start}{default_system}"
        "{%- for message in messages %}\n"
        f"{{{{- {header[0]} }}}}\n"
        "{%- if message['role'] == 'assistant' %}\n"
        f"{{{{- {pause} + message['content'] }}}}\n"
        "{%- else %}\n"
        "{{- message['content'] | trim }}\n"
        "{%- endif %}\n"
        f"{{{{- {end} }}}}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        f"{{{{- {header[1]} + {pause} }}}}\n"
        "{%- endif %}\n"
    )


def tokenizer_config(tokenizer: Any, fmt: ChatFormat, run_tokenizer: Any, template: str,
                     model_max_length: Optional[int]) -> Dict[str, Any]:
    """``tokenizer_config.json`` for transformers' ``PreTrainedTokenizerFast``."""
    def name(token_id: Optional[int]) -> Optional[str]:
        return tokenizer.id_to_token(token_id) if token_id is not None else None

    bos = run_tokenizer.bos_id if fmt.name == "llama3" else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(bos),
        "eos_token": name(fmt.end_of_turn_ids[0]),
        "pad_token": name(getattr(run_tokenizer, "pad_id", None)),
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    return config
