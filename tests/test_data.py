import json
import logging
import re

import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.datasets import PackedDataset

from torchtune_blah.data import (
    SquadRecord,
    SquadRecordError,
    answer_block,
    load_squad_records,
    squad_chat_dataset,
    squad_messages,
    tokenize_chat,
)
from torchtune_blah.data.show import format_sample, main as show_main
from torchtune_blah.pause import pause_tokens
from torchtune_blah.tiny import TINY_VOCAB_SIZE

BEYONCE = SquadRecord(
    id="made-up", context="Beyoncé Giselle Knowles-Carter is an American singer.",
    question="When did Beyonce start becoming popular?", answers=("in the late 1990s",),
)
IGNORE = CROSS_ENTROPY_IGNORE_IDX


def _seed_style_tokens(tokenizer, seed_messages, pause_names, pause_ids):
    """llama-squad's tokens, computed its way: render the Llama 3 chat template
    as text (contents trimmed), split at special tokens, BPE-encode the pieces."""
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in seed_messages
    )
    specials = {**tokenizer.special_tokens, **dict(zip(pause_names, pause_ids))}
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    tokens = []
    for piece in re.split(pattern, text):
        if piece in specials:
            tokens.append(specials[piece])
        elif piece:
            tokens += tokenizer.encode(piece, add_bos=False, add_eos=False)
    return tokens


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("style", ["single_turn", "multi_turn"])
def test_messages_are_byte_identical_to_the_seed(seed_prompts, style):
    ours = squad_messages(BEYONCE, style)
    pause_text = "".join(f"<blah_{i}>" for i in range(5))
    seed = seed_prompts[style]
    assert [m.role for m in ours] == [m["role"] for m in seed]
    for mine, theirs in zip(ours, seed):
        content = pause_text + mine.content if mine.role == "assistant" else mine.content
        assert content == theirs["content"]


@pytest.mark.parametrize("style", ["single_turn", "multi_turn"])
def test_token_sequence_equals_the_seeds(tokenizer, seed_prompts, style):
    spec = pause_tokens(num=5, vocab_size=TINY_VOCAB_SIZE)
    tokens, supervised = tokenize_chat(tokenizer, squad_messages(BEYONCE, style), spec.sequence)
    assert tokens == _seed_style_tokens(tokenizer, seed_prompts[style], spec.names, spec.ids)
    # Pause ids stand right after each assistant header, never supervised.
    header = [tokenizer.start_header_id, *tokenizer.encode("assistant", add_bos=False, add_eos=False),
              tokenizer.end_header_id, *tokenizer.encode("\n\n", add_bos=False, add_eos=False)]
    starts = [i for i in range(len(tokens)) if tokens[i:i + 5] == spec.sequence]
    assert len(starts) == (1 if style == "single_turn" else 2)
    for s in starts:
        assert tokens[s - len(header):s] == header
        assert not any(supervised[s:s + 5]) and all(supervised[s + 5:s + 8])


def test_non_ascii_answers_are_kept_as_is():
    assert answer_block("Beyoncé") == '\n```json\n{\n  "answer": "Beyoncé"\n}\n```'
    assert answer_block('say "hi"') == '\n```json\n{\n  "answer": "say \\"hi\\""\n}\n```'
    assert json.loads(answer_block("?").split("```json")[1].split("```")[0]) == {"answer": "?"}


def test_prompts_are_overridable_and_checked():
    messages = squad_messages(BEYONCE, "single_turn", system_prompt=None, single_turn_prompt="Q: {question} C: {context}")
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].content == f"Q: {BEYONCE.question} C: {BEYONCE.context}"
    tricky = SquadRecord(id="x", context="a {question} b", question="why?", answers=())
    assert squad_messages(tricky)[1].content.endswith("Context: a {question} b\nQuestion: why?")


# ----------------------------------------------------------------------------- labels on real samples


@pytest.mark.parametrize("style", ["single_turn", "multi_turn"])
def test_supervised_tokens_of_real_samples_are_exactly_the_answer_blocks(tokenizer, squad_path, append_spec, style):
    ds = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens=append_spec,
                            prompt_style=style)
    assert len(ds) == 626
    eot = "<|eot_id|>"
    checked_no_answer = checked_answer = 0
    for i in range(0, 626, 7):
        record, sample = ds.records[i], ds[i]
        assert len(sample["tokens"]) == len(sample["labels"])
        supervised = [t for t in sample["labels"] if t != IGNORE]
        decoded = tokenizer.decode(supervised, truncate_at_eos=False, skip_special_tokens=False)
        expected = answer_block(record.first_answer) + eot
        if style == "multi_turn":
            expected = answer_block("yes" if record.has_answer else "no") + eot + expected
        assert decoded == expected
        # Supervised labels are the tokens themselves, at their own positions.
        assert all(l in (IGNORE, t) for t, l in zip(sample["tokens"], sample["labels"]))
        # Pause positions are never supervised.
        assert all(l == IGNORE for t, l in zip(sample["tokens"], sample["labels"]) if t >= TINY_VOCAB_SIZE)
        checked_answer += record.has_answer
        checked_no_answer += not record.has_answer
    assert checked_answer > 10 and checked_no_answer > 10


def test_all_answers_keeps_every_gold_answer_and_trains_on_the_first(tokenizer, squad_path, append_spec):
    ds = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens=append_spec,
                            all_answers=True)
    sample = ds[1]
    assert sample["id"] == "56ddde6b9a695914005b9629"
    assert sample["answers"] == ["10th and 11th centuries", "in the 10th and 11th centuries",
                                 "10th and 11th centuries", "10th and 11th centuries"]
    supervised = [t for t in sample["labels"] if t != IGNORE]
    assert tokenizer.decode(supervised, skip_special_tokens=True).startswith(answer_block("10th and 11th centuries"))


def test_no_pause_tokens_is_plain_answer_only_sft(tokenizer, squad_path):
    ds = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens={"num": 0})
    tokens = ds[0]["tokens"]
    assert max(tokens) < TINY_VOCAB_SIZE
    # header "\n\n" then immediately the reply's "\n```json"
    reply = tokenizer.encode(answer_block("France"), add_bos=False, add_eos=False)
    assert tokens[-len(reply) - 1:-1] == reply


# ----------------------------------------------------------------------------- sources


def _flat_records(official):
    for article in official["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield {"id": qa["id"], "title": article["title"], "context": paragraph["context"],
                       "question": qa["question"], "answers": qa["answers"]}


def test_three_sources_yield_identical_samples(tokenizer, squad_path, squad_official, append_spec, tmp_path):
    import datasets

    flat = list(_flat_records(squad_official))
    # 1. flat JSONL: answers as plain strings (how corrected examples come back)
    jsonl = tmp_path / "flat.jsonl"
    jsonl.write_text("\n".join(json.dumps({**r, "answers": [a["text"] for a in r["answers"]]}) for r in flat))
    # 2. the hub's flat layout, read through datasets.load_dataset (the code path of rajpurkar/squad_v2)
    hub_rows = [{**r, "answers": {"text": [a["text"] for a in r["answers"]],
                                  "answer_start": [a["answer_start"] for a in r["answers"]]}} for r in flat]
    parquet = tmp_path / "hub.parquet"
    datasets.Dataset.from_list(hub_rows).to_parquet(str(parquet))

    official = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens=append_spec)
    from_jsonl = squad_chat_dataset(tokenizer, source="json", data_files=str(jsonl), pause_tokens=append_spec)
    from_hub = squad_chat_dataset(tokenizer, source="parquet", data_files=str(parquet), split="train",
                                  pause_tokens=append_spec)
    assert len(official) == len(from_jsonl) == len(from_hub) == 626
    assert official.records == from_jsonl.records == from_hub.records
    for i in range(626):
        assert official[i] == from_jsonl[i] == from_hub[i]


def test_flat_json_list_without_ids_and_answer_shapes(tmp_path):
    path = tmp_path / "corrections.json"
    path.write_text(json.dumps([
        {"context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France"]},
        {"context": "Paris is in France.", "question": "Where is Rome?", "answers": []},
        {"context": "Paris is in France.", "question": "What is Paris in?", "answers": [{"text": "France"}]},
    ]))
    records = load_squad_records("json", data_files=str(path))
    assert [r.answers for r in records] == [("France",), (), ("France",)]
    assert len({r.id for r in records}) == 3
    assert load_squad_records("json", data_files=str(path))[0].id == records[0].id  # stable ids


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "q7", "question": "Where?", "answers": []}, r"record 1 \(id 'q7'\) of .*: missing field 'context'"),
        ({"context": "c", "answers": []}, r"record 1 of .*: missing field 'question'"),
        ({"context": "c", "question": "q"}, r"missing field 'answers' \(use \[\] for a question without an answer\)"),
        ({"context": "c", "question": "q", "answers": "France"}, r"field 'answers' must be a list of strings"),
        ({"context": "c", "question": "q", "answers": [1, 2]}, r"field 'answers' must be a list of strings"),
        ({"context": "", "question": "q", "answers": []}, r"field 'context' must be a non-empty string"),
    ],
)
def test_bad_records_fail_naming_record_and_field(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    good = {"context": "c", "question": "fine", "answers": []}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(SquadRecordError, match=message):
        load_squad_records("json", data_files=str(path))


def test_bad_configuration_errors(tokenizer, squad_path, tmp_path):
    with pytest.raises(ValueError, match="prompt_style must be one of"):
        squad_chat_dataset(tokenizer, source="json", data_files=squad_path, prompt_style="three_turn")
    with pytest.raises(ValueError, match=r"single_turn_prompt must contain \{context\}"):
        squad_chat_dataset(tokenizer, source="json", data_files=squad_path, single_turn_prompt="Q: {question}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        squad_chat_dataset(tokenizer, source="json", data_files=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="needs data_files"):
        squad_chat_dataset(tokenizer, source="json")
    with pytest.raises(ValueError, match="vocab_size is required"):
        squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens={"num": 5})


# ----------------------------------------------------------------------------- long examples, collation, packing


def test_long_examples_are_skipped_and_reported_never_truncated(tokenizer, squad_path, append_spec, caplog):
    full = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens=append_spec)
    lengths = sorted(len(s["tokens"]) for s in full)
    limit = lengths[len(lengths) // 2]
    with caplog.at_level(logging.WARNING):
        ds = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens=append_spec,
                                max_seq_len=limit)
    expected_skips = sum(n > limit for n in lengths)
    assert len(ds.skipped_ids) == expected_skips and len(ds) == 626 - expected_skips
    assert f"skipped {expected_skips} of 626 examples longer than max_seq_len={limit}" in caplog.text
    kept = {r.id for r in ds.records}
    for i, record in enumerate(full.records):
        if record.id in kept:
            continue
        assert len(full[i]["tokens"]) > limit
    for sample in ds:
        assert len(sample["tokens"]) <= limit and sample["tokens"][-1] == tokenizer.eot_id
    with pytest.raises(ValueError, match="every example is longer than max_seq_len=10"):
        squad_chat_dataset(tokenizer, source="json", data_files=squad_path, max_seq_len=10)


def test_compact_storage_gives_the_samples_of_plain_tokenization(tokenizer, squad_path, append_spec):
    """The dataset keeps ids in one int array and a supervised byte per token; every sample, the
    skipped ones and the order are those of tokenizing each record on its own."""
    from torchtune_blah.data.chat import answer_only_labels

    pause = pause_tokens(**append_spec)
    records = load_squad_records("json", data_files=squad_path)
    ds = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens=append_spec,
                            max_seq_len=700, all_answers=True, prompt_style="multi_turn")
    expected, skipped = [], []
    for r in records:
        tokens, supervised = tokenize_chat(tokenizer, squad_messages(r, "multi_turn"), pause.sequence)
        if len(tokens) > 700:
            skipped.append(r.id)
        else:
            expected.append({"tokens": tokens, "labels": answer_only_labels(tokens, supervised), "id": r.id,
                             "answers": list(r.answers)})
    assert skipped and ds.skipped_ids == skipped
    assert [ds[i] for i in range(len(ds))] == expected and ds[-1] == expected[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_padded_collate_and_packing_accept_samples(tokenizer, squad_path, append_spec):
    ds = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens=append_spec)
    batch = padded_collate_sft([ds[0], ds[1], ds[2]], padding_idx=tokenizer.pad_id)
    assert batch["tokens"].shape == batch["labels"].shape and batch["tokens"].shape[0] == 3
    packed = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens=append_spec,
                                max_seq_len=2048, packed=True)
    assert isinstance(packed, PackedDataset)
    pack = packed[0]
    assert pack["tokens"].shape == (2048,) and pack["labels"].shape == (2048,)
    first = ds[0]
    assert pack["tokens"][: len(first["tokens"])].tolist() == first["tokens"]
    assert pack["labels"][: len(first["labels"])].tolist() == first["labels"]
    total_supervised = sum(int((packed[i]["labels"] != IGNORE).sum()) for i in range(len(packed)))
    assert total_supervised == sum(sum(l != IGNORE for l in s["labels"]) for s in ds)


# ----------------------------------------------------------------------------- seeing a sample


def test_format_sample_marks_supervised_and_pause_tokens(tokenizer, squad_path, append_spec):
    ds = squad_chat_dataset(tokenizer, source="json", data_files=squad_path, pause_tokens=append_spec)
    text = format_sample(tokenizer, ds[0], ds.pause)
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n{<blah_0><blah_1><blah_2><blah_3><blah_4>}[[" in text
    assert text.endswith("[[" + answer_block("France") + "<|eot_id|>]]")
    assert text.count("[[") == 1 and "Question: In what country is Normandy located?" in text
    colored = format_sample(tokenizer, ds[0], ds.pause, color=True)
    assert "\033[32m" + answer_block("France") in colored


def test_show_command(tokenizer, tiny_tokenizer_path, squad_path, tmp_path, capsys):
    config = tmp_path / "show.yaml"
    config.write_text(
        "pause_tokens:\n  num: 3\n  mode: reserved\n"
        f"tokenizer:\n  _component_: torchtune_blah.tiny.tiny_llama3_tokenizer\n  path: {tiny_tokenizer_path}\n"
        f"dataset:\n  _component_: torchtune_blah.data.squad_chat_dataset\n  source: json\n"
        f"  data_files: {squad_path}\n  pause_tokens: ${{pause_tokens}}\n"
    )
    assert show_main(["--config", str(config), "--index", "3", "--plain", "dataset.prompt_style=multi_turn"]) == 0
    out = capsys.readouterr().out
    names = "".join(f"<|reserved_special_token_{10 + i}|>" for i in range(3))
    assert out.count("{" + names + "}") == 2  # both assistant turns of the two-turn style
    assert "-- sample 3 of 626:" in out and "3 pause tokens per assistant turn" in out
    with pytest.raises(SystemExit):
        show_main(["--config", str(config), "--index", "9999"])


def test_holdout_split_is_disjoint_seeded_and_complete(tokenizer, squad_path, append_spec):
    kwargs = dict(source="json", data_files=squad_path, pause_tokens=append_spec, holdout_fraction=0.05,
                  holdout_seed=42)
    train = squad_chat_dataset(tokenizer, **kwargs)
    held = squad_chat_dataset(tokenizer, part="holdout", **kwargs)
    train_ids, held_ids = {r.id for r in train.records}, {r.id for r in held.records}
    assert len(held_ids) == 31 and len(train_ids) == 626 - 31 and not train_ids & held_ids
    again = squad_chat_dataset(tokenizer, part="holdout", **kwargs)
    assert [r.id for r in again.records] == [r.id for r in held.records]
    other = squad_chat_dataset(tokenizer, part="holdout", **{**kwargs, "holdout_seed": 7})
    assert {r.id for r in other.records} != held_ids
    with pytest.raises(ValueError, match="holds out nothing"):
        squad_chat_dataset(tokenizer, source="json", data_files=squad_path, part="holdout")
