"""Our chat rendering equals transformers' apply_chat_template, for Llama 3, SmolLM2 and Qwen2.5.

Pause tokens are spliced in llama-squad's way: transformers sees them as special tokens written at
the start of the assistant's content (``<blah_0>..<blah_4>`` + reply), so the text is split at
them exactly as our ids are. Tokenizer files of Llama 3 and Qwen2.5 cannot be had offline, so
their published chat templates are paired with tokenizers we do have: Llama 3's with the tiny
tiktoken BPE (converted for transformers by its own TikTokenConverter), Qwen2.5's with SmolLM2's
vocabulary loaded by torchtune's own ``qwen2_5_tokenizer``.
"""

import json
import os

import pytest
from smollm2_fixtures import prepared_smollm2_dir
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from torchtune_blah.chat_format import ChatMLChatFormat, Llama3ChatFormat, chat_format
from torchtune_blah.data.chat import answer_prompt, squad_chat_dataset, tokenize_chat
from torchtune_blah.data.squad import ANSWER_PREFIX, load_squad_records, squad_messages
from torchtune_blah.generation import stop_token_ids
from torchtune_blah.pause import pause_tokens
from torchtune_blah.tiny import TINY_VOCAB_SIZE

HERE = os.path.dirname(os.path.abspath(__file__))
PAUSE_NAMES = [f"<blah_{i}>" for i in range(5)]

with open(os.path.join(HERE, "data", "chat_templates.json"), encoding="utf-8") as f:
    TEMPLATES = json.load(f)


@pytest.fixture(scope="module")
def records():
    recs = load_squad_records("bundled_sample")
    return [next(r for r in recs if r.has_answer), next(r for r in recs if not r.has_answer)]


def _hf_messages(record, style, pause_text):
    """llama-squad's messages as transformers takes them: trimmed contents (as llama-squad's Llama 3
    template trimmed them), the pause tokens written before each assistant reply."""
    out = []
    for m in squad_messages(record, style):
        content = pause_text + m.content if m.role == "assistant" else m.content.strip()
        out.append({"role": m.role, "content": content})
    return out


def _ids(result):
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def _check(hf_tok, our_tok, records, pause_ids, end_text, id_map=None):
    fmt = chat_format(our_tok)
    remap = (lambda ids: [id_map.get(i, i) for i in ids]) if id_map else list  # noqa: E731
    for record in records:
        for style in ("single_turn", "multi_turn"):
            theirs = remap(_ids(hf_tok.apply_chat_template(_hf_messages(record, style, "".join(PAUSE_NAMES)),
                                                           tokenize=True)))
            ours, supervised = tokenize_chat(our_tok, squad_messages(record, style), pause_ids)
            assert ours == theirs, (style, fmt.decode(ours, False))
            # Answer-only labels: exactly the JSON block(s) + end of turn.
            replies = [m.content for m in squad_messages(record, style) if m.role == "assistant"]
            assert fmt.decode([t for t, s in zip(ours, supervised) if s], False) == "".join(r + end_text for r in replies)
            # The evaluation prompt is the conversation up to the generation prompt, the pause ids and the forced prefix.
            msgs = _hf_messages(record, style, "")
            first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompt = remap(_ids(hf_tok.apply_chat_template(msgs[:first], add_generation_prompt=True, tokenize=True)))
            assert answer_prompt(our_tok, record, pause_ids, style) == prompt + pause_ids + fmt.encode(ANSWER_PREFIX)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from torchtune_blah.models.smollm2 import smollm2_tokenizer

    directory = prepared_smollm2_dir()
    hf = AutoTokenizer.from_pretrained(directory)
    return hf, smollm2_tokenizer(os.path.join(directory, "tokenizer.json"))


def test_smollm2_equals_apply_chat_template_with_its_own_template(smollm2, records):
    hf, ours = smollm2
    hf.add_special_tokens({"additional_special_tokens": PAUSE_NAMES})
    pause = pause_tokens(num=5, mode="append", vocab_size=49152)
    assert [hf.convert_tokens_to_ids(n) for n in PAUSE_NAMES] == pause.sequence  # append ids = the next free ids
    assert isinstance(chat_format(ours), ChatMLChatFormat)
    _check(hf, ours, records, pause.sequence, "<|im_end|>")


def test_smollm2_default_system_prompt_matches_its_template(smollm2, records):
    hf, ours = smollm2
    msgs = [m for m in _hf_messages(records[0], "single_turn", "") if m["role"] != "system"]
    from torchtune_blah.data.squad import ChatMessage

    theirs = _ids(hf.apply_chat_template(msgs, tokenize=True))
    assert tokenize_chat(ours, [ChatMessage(m["role"], m["content"]) for m in msgs])[0] == theirs


def test_qwen2_5_equals_apply_chat_template_with_qwens_template(smollm2, records, tmp_path):
    """torchtune's Qwen2_5Tokenizer on SmolLM2's vocab + merges, against a transformers tokenizer
    built from the same files with Qwen2.5's pre-tokenizer, special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast

    _, smol = smollm2
    bpe = json.loads(smol.hf.tokenizer.to_str())["model"]
    vocab = {k: v for k, v in bpe["vocab"].items() if not k.startswith("<|")}  # drop SmolLM2's own specials
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    with open(tmp_path / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(tmp_path / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # Qwen's special tokens (and ours) at fresh ids after the vocabulary, in Qwen's order.
    specials = sorted(QWEN2_5_SPECIAL_TOKENS, key=QWEN2_5_SPECIAL_TOKENS.get) + PAUSE_NAMES
    backend.add_special_tokens(specials)
    backend.save(str(tmp_path / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = TEMPLATES["qwen2_5"]
    ours = qwen2_5_tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                             special_tokens_path=str(tmp_path / "tokenizer.json"))
    pause = pause_tokens(num=5, mode="reserved", reserved_tokens=PAUSE_NAMES, tokenizer=ours)
    assert list(pause.ids) == [backend.token_to_id(n) for n in PAUSE_NAMES]
    assert isinstance(chat_format(ours), ChatMLChatFormat)
    _check(hf, ours, records, pause.sequence, "<|im_end|>")
    # Without a system turn, Qwen's template adds its default one: so do we.
    from torchtune_blah.data.squad import ChatMessage

    msgs = [{"role": "user", "content": "Hi"}]
    theirs = _ids(hf.apply_chat_template(msgs, tokenize=True))
    assert tokenize_chat(ours, [ChatMessage(**m) for m in msgs])[0] == theirs


def test_llama3_equals_apply_chat_template_with_llama3s_template(tokenizer, tiny_tokenizer_path, records):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    special = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    backend = TikTokenConverter(vocab_file=tiny_tokenizer_path, extra_special_tokens=special).converted()
    backend.add_special_tokens(PAUSE_NAMES)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = TEMPLATES["llama3"]
    # The BPE ids are the tiktoken ranks in both; transformers numbers the special tokens
    # densely, the tiny tokenizer keeps Llama 3's gaps: compare them by name.
    pause = pause_tokens(num=5, mode="append", vocab_size=TINY_VOCAB_SIZE)
    id_map = {backend.token_to_id(n): i for n, i in tokenizer.special_tokens.items()}
    id_map.update({backend.token_to_id(n): i for n, i in zip(PAUSE_NAMES, pause.ids)})
    assert all(h >= 1024 for h in id_map)
    assert isinstance(chat_format(tokenizer), Llama3ChatFormat)
    _check(hf, tokenizer, records, pause.sequence, "<|eot_id|>", id_map)


def test_stop_ids_come_from_token_texts_for_any_tokenizer(smollm2, tokenizer):
    _, smol = smollm2
    for tok in (smol, tokenizer):
        fmt = chat_format(tok)
        stops = stop_token_ids(tok)
        assert set(fmt.end_ids) <= stops
        texts = fmt.token_texts()
        assert all("}" in texts[i] for i in stops - set(fmt.end_ids))
        assert sum("}" in t for t in texts) == len(stops - set(fmt.end_ids))
        assert fmt.encode("}")[0] in stops and fmt.encode('"\n}')[-1] in stops
    assert chat_format(smol).end_ids == [smol.special_tokens["<|endoftext|>"], smol.special_tokens["<|im_end|>"]]


def test_a_tokenizer_without_a_chat_format_is_a_clear_error(smollm2):
    class NoChat:
        special_tokens = {"<s>": 1, "</s>": 2}

        def encode(self, text, add_bos=True, add_eos=True):
            return [3]

    with pytest.raises(TypeError, match=r"NoChat has no chat format.*<\|im_start\|>.*<s>"):
        squad_chat_dataset(NoChat(), source="bundled_sample")


def test_smollm2_dataset_labels_end_with_im_end_and_skip_the_newline(smollm2):
    _, smol = smollm2
    ds = squad_chat_dataset(smol, source="bundled_train", pause_tokens={"num": 5, "mode": "append",
                                                                         "vocab_size": 49152})
    sample = ds[0]
    im_end = smol.special_tokens["<|im_end|>"]
    assert sample["tokens"][-2:] == [im_end] + smol.encode("\n", add_bos=False, add_eos=False)
    assert sample["labels"][-2:] == [im_end, CROSS_ENTROPY_IGNORE_IDX]
    start = sample["tokens"].index(49152)
    assert sample["tokens"][start:start + 5] == [49152, 49153, 49154, 49155, 49156]
    assert all(label == CROSS_ENTROPY_IGNORE_IDX for label in sample["labels"][: start + 5])
