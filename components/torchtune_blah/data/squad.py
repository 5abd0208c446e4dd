"""SQuAD 2.0 records from any of three sources, and the article's chat prompts (llama-squad's).

(Over 350 lines because it holds every source's reader, the bundled slices and their article
splits, and the prompt texts: one owner for "what a SQuAD question is".)

Sources, all normalised to ``SquadRecord``:

- the Hugging Face hub (or any ``datasets.load_dataset`` builder), flat rows with
  ``answers = {"text": [...], "answer_start": [...]}`` (``rajpurkar/squad_v2``);
- the official SQuAD 2.0 JSON files (``data -> paragraphs -> qas``), detected
  and flattened;
- flat JSON / JSONL records ``{id?, context, question, answers}`` with answers as
  a list of strings, a list of ``{"text": ...}`` objects or ``{"text": [...]}``;
  an empty list means the question has no answer. This is how corrected
  examples come back from human review.

A bad record fails with an error that names the record and the field.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torchtune_blah.resumable import read_jsonl_objects

# The article's prompts, byte for byte (../shared/article/prompts.md). Message contents
# are trimmed when tokenized, as llama-squad's chat template does, so the system
# prompt's trailing newline never reaches the model.
SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
    "positive in nature.\nIf a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. If you don't know the answer to a "
    "question, please don't share false information.\n"
)
SINGLE_TURN_PROMPT = (
    "Extract from the following context the minimal span word for word that best answers the "
    "question. Think step by step and explain your reasoning. Then give the answer in JSON format "
    "as follows:\n```json\n{\n  \"answer\": ...\n}\n```\nIf the answer is not in the context, the "
    "answer should be \"?\".\nContext: {context}\nQuestion: {question}"
)
# "the the" is in llama-squad's prompt (sic): kept so prompts match what its models saw.
MULTI_TURN_FIRST_PROMPT = (
    "Does the the following context contain enough information to be able to answer the question? "
    "Think step by step and explain your reasoning. Then give the answer in JSON format as follows:"
    "\n```json\n{\n  \"answer\": ... # \"yes\" or \"no\"\n}\n```\nContext: {context}\nQuestion: {question}"
)
MULTI_TURN_SECOND_PROMPT = (
    "If the question has an answer in the context, extract the minimal span word for word from the "
    "context that best answers the question, otherwise the answer should be \"?\". Think step by "
    "step and explain your reasoning. Then give the answer in JSON format as follows:\n```json\n{\n"
    "  \"answer\": ...\n}\n```"
)
NO_ANSWER = "?"
PROMPT_STYLES = ("single_turn", "multi_turn")
# What evaluation forces after the pause tokens before the model speaks.
ANSWER_PREFIX = "\n```json"


@dataclass(frozen=True)
class SquadRecord:
    """One SQuAD 2.0 question. ``answers`` is empty when the context has no answer."""

    id: str
    context: str
    question: str
    answers: Tuple[str, ...]
    title: str = ""

    @property
    def has_answer(self) -> bool:
        return len(self.answers) > 0

    @property
    def first_answer(self) -> str:
        """The training target: the first gold answer, ``"?"`` for none."""
        return self.answers[0] if self.answers else NO_ANSWER


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


def answer_block(answer: str) -> str:
    """The assistant's reply after the pause tokens: llama-squad's JSON block.

    The answer is JSON-encoded with non-ASCII characters kept as they are
    (llama-squad escaped them as ``\\u00e9``; same parsed value, fewer tokens).
    """
    return ANSWER_PREFIX + '\n{\n  "answer": ' + json.dumps(answer, ensure_ascii=False) + "\n}\n```"


_FIELD = re.compile(r"\{(context|question)\}")


def _fill(template: str, record: SquadRecord) -> str:
    # One pass, so a context that happens to contain "{question}" stays literal,
    # and the literal braces of the JSON example need no escaping.
    values = {"context": record.context, "question": record.question}
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def squad_messages(
    record: SquadRecord,
    prompt_style: str = "single_turn",
    system_prompt: Optional[str] = SYSTEM_PROMPT,
    single_turn_prompt: str = SINGLE_TURN_PROMPT,
    multi_turn_first_prompt: str = MULTI_TURN_FIRST_PROMPT,
    multi_turn_second_prompt: str = MULTI_TURN_SECOND_PROMPT,
    answer: Optional[str] = None,
) -> List[ChatMessage]:
    """The article's conversation for one record; assistant turns hold ``answer_block`` text.

    ``answer`` defaults to the record's first gold answer (``"?"`` when none). The
    two-turn style first asks whether the context answers the question ("yes" /
    "no"), then asks for the span.
    """
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    answer = record.first_answer if answer is None else answer
    messages = [ChatMessage("system", system_prompt)] if system_prompt else []
    if prompt_style == "single_turn":
        messages += [
            ChatMessage("user", _fill(single_turn_prompt, record)),
            ChatMessage("assistant", answer_block(answer)),
        ]
    else:
        messages += [
            ChatMessage("user", _fill(multi_turn_first_prompt, record)),
            ChatMessage("assistant", answer_block("no" if answer == NO_ANSWER else "yes")),
            ChatMessage("user", _fill(multi_turn_second_prompt, record)),
            ChatMessage("assistant", answer_block(answer)),
        ]
    return messages


def check_prompt_templates(prompt_style: str, single_turn_prompt: str, multi_turn_first_prompt: str) -> None:
    """Fail early on a template that would silently drop the context or the question."""
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    key, template = (
        ("single_turn_prompt", single_turn_prompt)
        if prompt_style == "single_turn"
        else ("multi_turn_first_prompt", multi_turn_first_prompt)
    )
    for field in ("{context}", "{question}"):
        if field not in template:
            raise ValueError(f"{key} must contain {field}: the record's text goes there")


# ----------------------------------------------------------------------------- loading


# Real SQuAD 2.0 slices shipped in torchtune_blah/data/assets (CC BY-SA 4.0, see ATTRIBUTION.md there).
BUNDLED = {
    "bundled_sample": "squad_v2_sample.json",  # dev-set articles: 626 questions, 333 unanswerable
    "bundled_train": "squad_v2_train_short.json",  # training-set articles: 591 questions, 197 unanswerable
    "bundled_pool": "squad_v2_dev_pool_short.json",  # 20 other dev-set articles: 3,379 questions, 1,705 unanswerable
}
# bundled_pool is split by whole article, so that validation predicts articles a model never saw:
# split "validation" is these 4 articles (603 questions, 296 unanswerable), "train" the other 16
# (2,776 questions, 1,409 unanswerable), "all" both. None of the 20 is in bundled_sample, the
# held-out measurement set.
POOL_VALIDATION_ARTICLES = ("Black_Death", "Pharmacy", "Private_school", "Scottish_Parliament")
POOL_SPLITS = ("train", "validation", "all")


def pool_split(records: Sequence["SquadRecord"], split: str) -> List["SquadRecord"]:
    """The records of bundled_pool's ``split``: ``train``, ``validation`` (whole articles) or ``all``."""
    if split not in POOL_SPLITS:
        raise ValueError(f"dataset.split={split!r}: bundled_pool's splits are {POOL_SPLITS} (by article: "
                         f"validation is {', '.join(POOL_VALIDATION_ARTICLES)})")
    if split == "all":
        return list(records)
    return [r for r in records if (r.title in POOL_VALIDATION_ARTICLES) == (split == "validation")]


def bundled_path(name: str) -> str:
    from importlib.resources import files

    return str(files("torchtune_blah.data") / "assets" / BUNDLED[name])


def filter_context_words(records: Sequence[SquadRecord], max_context_words: Optional[int]) -> List[SquadRecord]:
    """The records whose context has at most ``max_context_words`` words (None: all)."""
    if max_context_words is None:
        return list(records)
    kept = [r for r in records if len(r.context.split()) <= int(max_context_words)]
    if not kept:
        raise ValueError(f"max_context_words={max_context_words} leaves no question; raise it")
    return kept


class SquadRecordError(ValueError):
    """A record that cannot be read; the message names the record and the field."""


def _where(origin: str, index: int, raw: Any) -> str:
    rid = raw.get("id") if isinstance(raw, Mapping) else None
    return f"record {index}" + (f" (id {rid!r})" if rid is not None else "") + f" of {origin}"


def _answer_texts(raw_answers: Any, where: str) -> Tuple[str, ...]:
    if isinstance(raw_answers, Mapping) and "text" in raw_answers:  # hub: {"text": [...], "answer_start": [...]}
        texts = raw_answers["text"]
    elif isinstance(raw_answers, (list, tuple)):
        texts = [a["text"] if isinstance(a, Mapping) and "text" in a else a for a in raw_answers]
    else:
        texts = None
    if texts is None or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise SquadRecordError(
            f"{where}: field 'answers' must be a list of strings, a list of {{\"text\": ...}} objects or "
            f"{{\"text\": [...]}} (an empty list when there is no answer); got {raw_answers!r:.200}"
        )
    return tuple(texts)


def question_id(context: str, question: str) -> str:
    """The id of a question given without one. Stable across sources and runs, so resumed
    evaluations, generations and review queues line up."""
    return hashlib.sha1((context + "\x00" + question).encode("utf-8")).hexdigest()[:24]


def record_from_dict(raw: Any, origin: str = "input", index: int = 0) -> SquadRecord:
    """Validate and normalise one flat record (hub row, flattened official qa, or user JSON)."""
    where = _where(origin, index, raw)
    if not isinstance(raw, Mapping):
        raise SquadRecordError(f"{where}: expected an object with context, question and answers; got {type(raw).__name__}")
    for field in ("context", "question"):
        if field not in raw:
            raise SquadRecordError(f"{where}: missing field '{field}'")
        if not isinstance(raw[field], str) or not raw[field].strip():
            raise SquadRecordError(f"{where}: field '{field}' must be a non-empty string, got {raw[field]!r:.100}")
    if "answers" not in raw:
        raise SquadRecordError(f"{where}: missing field 'answers' (use [] for a question without an answer)")
    answers = _answer_texts(raw["answers"], where)
    if raw.get("is_impossible") is True and answers:
        raise SquadRecordError(f"{where}: 'is_impossible' is true but 'answers' is not empty")
    rid = raw.get("id")
    if rid is None:
        rid = question_id(raw["context"], raw["question"])
    return SquadRecord(
        id=str(rid), context=raw["context"], question=raw["question"], answers=answers,
        title=str(raw.get("title") or ""),
    )


def _is_official(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("data"), list)
        and all(isinstance(a, Mapping) and "paragraphs" in a for a in obj["data"])
    )


def _flatten_official(obj: Mapping, origin: str) -> Iterable[Dict[str, Any]]:
    for a, article in enumerate(obj["data"]):
        for p, paragraph in enumerate(article["paragraphs"]):
            if "context" not in paragraph or "qas" not in paragraph:
                raise SquadRecordError(f"{origin}: data[{a}].paragraphs[{p}] lacks 'context' or 'qas'")
            for qa in paragraph["qas"]:
                yield {**qa, "context": paragraph["context"], "title": article.get("title", "")}


def _read_json_file(path: str) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data_files: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if obj is None:  # JSON Lines
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SquadRecordError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        return rows
    if _is_official(obj):
        return list(_flatten_official(obj, path))
    if isinstance(obj, Mapping) and isinstance(obj.get("data"), list):
        return obj["data"]
    if isinstance(obj, list):
        return obj
    if isinstance(obj, Mapping):
        return [obj]
    raise SquadRecordError(f"{path}: expected the official SQuAD format, a list of records or JSON Lines")


def load_squad_records(
    source: str = "rajpurkar/squad_v2",
    data_files: Union[None, str, Sequence[str]] = None,
    split: str = "train",
    **load_dataset_kwargs: Any,
) -> List[SquadRecord]:
    """Read SQuAD 2.0 questions from the hub, the official JSON, or flat JSON/JSONL.

    Args:
        source: ``"json"`` for local files (official format, JSON list or JSONL,
            detected per file), ``"bundled_sample"`` (626 dev-set questions),
            ``"bundled_train"`` (591 training-set questions with short contexts) or
            ``"bundled_pool"`` (3,379 questions of 20 other dev-set articles, short contexts,
            split by article) for the package's real SQuAD 2.0 slices, anything else goes to ``datasets.load_dataset``
            (``"rajpurkar/squad_v2"``, ``"parquet"``, a local dataset folder...).
        data_files: file or files for ``source="json"`` (and passed on otherwise).
        split: ``"train"`` / ``"validation"`` for the hub and ``bundled_pool`` (which also has
            ``"all"``); ignored for ``json`` and the other bundled slices.
    """
    if load_dataset_kwargs and (source == "json" or source in BUNDLED or source == "bundled_pool"):
        raise ValueError(f"dataset: {sorted(load_dataset_kwargs)} is not a setting of source={source!r} (extra "
                         "keys go to datasets.load_dataset, which this source does not use); remove them")
    if source == "bundled_pool":
        return pool_split(load_squad_records("json", bundled_path(source)), split)
    if source in BUNDLED:  # the real SQuAD 2.0 slices shipped with the package
        source, data_files = "json", bundled_path(source)
    if source == "json":
        if not data_files:
            raise ValueError("source 'json' needs data_files: a path or a list of paths")
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        records = []
        for path in files:
            path = os.path.expanduser(str(path))
            records += [record_from_dict(raw, path, i) for i, raw in enumerate(_read_json_file(path))]
    else:
        from datasets import load_dataset

        rows = load_dataset(source, data_files=data_files, split=split, **load_dataset_kwargs)
        records = [record_from_dict(raw, f"{source}[{split}]", i) for i, raw in enumerate(rows)]
    if not records:
        raise ValueError(f"no SQuAD records found in source={source!r} data_files={data_files!r}")
    seen: Dict[str, int] = {}
    for i, record in enumerate(records):
        if record.id in seen:
            raise SquadRecordError(f"record {i}: id {record.id!r} repeats record {seen[record.id]}; ids must be unique")
        seen[record.id] = i
    return records


def load_questions_jsonl(path: str) -> List[SquadRecord]:
    """Unlabeled questions, one JSON object per line: ``{"context": ..., "question": ...}`` with an
    optional ``id`` (default: ``question_id``) and ``title``; any ``answers`` are ignored.

    Every line is checked before anything runs; an error names the line and the field.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"questions: {path} does not exist")
    records, lines_of = [], {}
    for n, raw in read_jsonl_objects(path, SquadRecordError, label="questions: "):
        where = f"questions: line {n} of {path}"
        for field in ("context", "question"):
            if not isinstance(raw.get(field), str) or not raw[field].strip():
                raise SquadRecordError(f"{where}: field {field!r} must be a non-empty string")
        rid = raw.get("id")
        if rid is None:
            rid = question_id(raw["context"], raw["question"])
        elif not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            raise SquadRecordError(f"{where}: field 'id' must be a non-empty string")
        rid = str(rid)
        if rid in lines_of:
            raise SquadRecordError(f"{where}: id {rid!r} repeats line {lines_of[rid]} (the same question twice, "
                                   "or two records with one id); give each question its own id")
        lines_of[rid] = n
        records.append(SquadRecord(id=rid, context=raw["context"], question=raw["question"], answers=(),
                                   title=str(raw.get("title") or "")))
    if not records:
        raise SquadRecordError(f"questions: {path} holds no questions")
    return records
