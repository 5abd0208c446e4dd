"""Chat tokenization with pause ids, answer-only labels, and the dataset builder.

Each conversation is rendered by the tokenizer's chat format (``torchtune_blah.chat_format``:
Llama 3 or ChatML), with the pause ids right after each assistant header. For Llama 3 that
is llama-squad's token sequence::

    <|begin_of_text|>
    <|start_header_id|>system<|end_header_id|>\\n\\n {system} <|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n {user} <|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n <pause ids> \\n```json ... ``` <|eot_id|>

and for ChatML (Qwen2.5, SmolLM2)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n <pause ids> \\n```json ... ``` <|im_end|> \\n

Pause tokens go in as ids (torchtune's tiktoken tokenizers would encode their
text as plain text). The reply after them is encoded on its own and untrimmed,
exactly as llama-squad's tokenizer saw it after its special tokens.

Labels follow torchtune's SFT convention (aligned with ``tokens``; recipes shift
them): ``CROSS_ENTROPY_IGNORE_IDX`` everywhere except each assistant turn's reply
tokens and its end-of-turn token.
"""

import logging
import random
from array import array
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import PackedDataset

from torchtune_blah.chat_format import chat_format, render_chat
from torchtune_blah.data.squad import (
    ANSWER_PREFIX,
    MULTI_TURN_FIRST_PROMPT,
    MULTI_TURN_SECOND_PROMPT,
    SINGLE_TURN_PROMPT,
    SYSTEM_PROMPT,
    ChatMessage,
    SquadRecord,
    check_prompt_templates,
    filter_context_words,
    load_squad_records,
    squad_messages,
)
from torchtune_blah.data.replay import check_replay, with_replay
from torchtune_blah.pause import PauseTokens, as_pause_tokens

log = logging.getLogger(__name__)


def answer_only_labels(tokens: Sequence[int], supervised: Sequence[bool]) -> List[int]:
    """Labels for answer-only loss: the token where supervised, the ignore index elsewhere."""
    return [t if s else CROSS_ENTROPY_IGNORE_IDX for t, s in zip(tokens, supervised)]


def tokenize_chat(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    pause_ids: Sequence[int] = (),
    add_last_end: bool = True,
) -> Tuple[List[int], List[bool]]:
    """Token ids and one ``supervised`` flag per token (True: trained on) for a conversation.

    One polarity inside the package: ``supervised``. torchtune's ``mask`` (True: *not* trained on)
    appears only where its API asks for it (``models.smollm2.ChatMLTokenizer.tokenize_messages``).

    Args:
        tokenizer: a torchtune tokenizer with a known chat format, or a ``ChatFormat``.
        messages: system/user/assistant turns; assistant contents are the reply
            after the pause tokens (``answer_block`` text).
        pause_ids: inserted after every assistant header.
        add_last_end: False leaves the last assistant turn open (no end-of-turn),
            for prompting a model with a forced reply prefix.
    """
    return render_chat(chat_format(tokenizer), messages, pause_ids, add_last_end=add_last_end)


class SquadChatDataset(Dataset):
    """SQuAD 2.0 as tokenized chat samples with ``tokens`` and ``labels``.

    Everything is tokenized once, up front, so that examples longer than
    ``max_seq_len`` are known (and skipped, never truncated into a wrong target)
    before training starts. ``skipped_ids`` lists them.

    Storage is compact: every kept sample's ids back to back in one C int array and
    one byte per token saying whether it is supervised; ``__getitem__`` builds the
    lists a collate function expects. Python lists of ints cost ~44 bytes per token
    (tokens and labels); this costs 5 (``benchmarks/dataset_scale.py``: 130,319
    questions with Llama 3's tokenizer grew the process by 2,079 MiB before, 468 MiB
    after, of which 207 MiB are the tokens).
    """

    def __init__(
        self,
        tokenizer: Any,
        records: Sequence[SquadRecord],
        pause: PauseTokens,
        prompt_style: str = "single_turn",
        max_seq_len: Optional[int] = None,
        all_answers: bool = False,
        **prompts: Any,
    ):
        fmt = chat_format(tokenizer)
        self.pause = pause
        self.prompt_style = prompt_style
        self.max_seq_len = max_seq_len
        self.all_answers = all_answers
        self.records: List[SquadRecord] = []
        self.skipped_ids: List[str] = []
        self._tokens = array("i")  # sample i is _tokens[_offsets[i]:_offsets[i + 1]]
        self._supervised = bytearray()
        self._offsets = array("q", [0])
        for record in records:
            tokens, supervised = tokenize_chat(
                fmt, squad_messages(record, prompt_style, **prompts), pause.sequence
            )
            if max_seq_len is not None and len(tokens) > max_seq_len:
                self.skipped_ids.append(record.id)
                continue
            self.records.append(record)
            self._tokens.extend(tokens)
            self._supervised.extend(supervised)
            self._offsets.append(len(self._tokens))
        if self.skipped_ids:
            log.warning(
                "squad_chat_dataset: skipped %d of %d examples longer than max_seq_len=%d tokens "
                "(first ids: %s). Raise max_seq_len to keep them.",
                len(self.skipped_ids), len(records), max_seq_len, self.skipped_ids[:5],
            )
        if not self.records:
            raise ValueError(f"every example is longer than max_seq_len={max_seq_len}; raise max_seq_len")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if index < 0:
            index += len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        tokens = self._tokens[start:end].tolist()
        sample: Dict[str, Any] = {"tokens": tokens,
                                  "labels": answer_only_labels(tokens, self._supervised[start:end])}
        if self.all_answers:
            record = self.records[index]
            sample["id"], sample["answers"] = record.id, list(record.answers)
        return sample


def squad_chat_dataset(
    tokenizer: Any,
    source: str = "rajpurkar/squad_v2",
    data_files: Union[None, str, Sequence[str]] = None,
    split: str = "train",
    pause_tokens: Union[None, PauseTokens, Mapping[str, Any]] = None,
    prompt_style: str = "single_turn",
    system_prompt: Optional[str] = SYSTEM_PROMPT,
    single_turn_prompt: str = SINGLE_TURN_PROMPT,
    multi_turn_first_prompt: str = MULTI_TURN_FIRST_PROMPT,
    multi_turn_second_prompt: str = MULTI_TURN_SECOND_PROMPT,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    all_answers: bool = False,
    holdout_fraction: float = 0.0,
    holdout_seed: int = 42,
    part: str = "train",
    max_context_words: Optional[int] = None,
    replay: Optional[Mapping[str, Any]] = None,
    **load_dataset_kwargs: Any,
) -> Union[SquadChatDataset, PackedDataset]:
    """SQuAD 2.0 as chat with pause tokens and answer-only loss (``dataset._component_``).

    Args:
        tokenizer: a torchtune tokenizer with a chat format (Llama 3 or ChatML; the recipe passes it).
        source: ``"json"`` for local files (official SQuAD JSON, JSON list or JSONL
            of ``{id?, context, question, answers}``), else a ``datasets.load_dataset``
            name such as ``"rajpurkar/squad_v2"``.
        data_files: path(s) for ``source: json``.
        split: hub split (``train`` / ``validation``).
        pause_tokens: the ``pause_tokens`` config block (``num``, ``distinct``,
            ``mode``, ``vocab_size``, ...), a ``PauseTokens``, or None for no pause.
        prompt_style: ``single_turn`` or ``multi_turn`` (llama-squad's two variants).
        system_prompt, single_turn_prompt, multi_turn_first_prompt,
            multi_turn_second_prompt: llama-squad's texts by default; ``{context}`` and
            ``{question}`` are filled in. ``system_prompt: null`` drops the system turn.
        max_seq_len: longer examples are skipped and counted; defaults to
            ``tokenizer.max_seq_len``.
        packed: wrap in torchtune's ``PackedDataset`` (needs ``max_seq_len``).
        all_answers: add ``id`` and all gold ``answers`` to each sample (evaluation);
            the training target is always the first gold answer.
        holdout_fraction, holdout_seed: set aside this fraction of the records (a
            seeded random choice; llama-squad held out 0.5% with seed 42) for validation
            during training; ``part: train`` (default) gives the rest, ``part:
            holdout`` the held-out records.
        max_context_words: keep only questions whose context has at most this many
            words (short contexts make small CPU runs fit in minutes); None keeps all.
        replay: ``{from_run, ratio, seed}``: add ``ratio`` x (number of records) questions that the
            run ``from_run`` trained on (seeded; ``torchtune_blah.data.replay``), so that retraining
            on corrections does not forget; a ratio below 1 weights the corrections up. ``from_run:
            null`` replays nothing.
    """
    check_prompt_templates(prompt_style, single_turn_prompt, multi_turn_first_prompt)
    replay = check_replay(replay)
    pause = as_pause_tokens(pause_tokens, tokenizer)
    if max_seq_len is None:
        max_seq_len = getattr(tokenizer, "max_seq_len", None)
    if packed and max_seq_len is None:
        raise ValueError("packed: true needs max_seq_len (on the dataset or the tokenizer)")
    records = load_squad_records(source, data_files=data_files, split=split, **load_dataset_kwargs)
    records = filter_context_words(records, max_context_words)
    records = holdout_split(records, holdout_fraction, holdout_seed, part)
    if part == "train":  # (held-out questions are measured once, and never replayed)
        records = with_replay(records, replay, tokenizer)
    dataset = SquadChatDataset(
        tokenizer, records, pause, prompt_style=prompt_style, max_seq_len=max_seq_len,
        all_answers=all_answers, system_prompt=system_prompt, single_turn_prompt=single_turn_prompt,
        multi_turn_first_prompt=multi_turn_first_prompt, multi_turn_second_prompt=multi_turn_second_prompt,
    )
    if packed:
        return PackedDataset(dataset, max_seq_len=max_seq_len, padding_idx=tokenizer.pad_id, split_across_pack=False)
    return dataset


def holdout_split(records: Sequence[SquadRecord], fraction: float, seed: int, part: str) -> List[SquadRecord]:
    """The records of ``part`` ("train" or "holdout") when ``fraction`` of them are held out."""
    if part not in ("train", "holdout"):
        raise ValueError(f"part must be 'train' or 'holdout', got {part!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")
    count = round(fraction * len(records))
    if part == "holdout" and count == 0:
        raise ValueError(f"holdout_fraction={fraction} of {len(records)} records holds out nothing; raise it")
    held = set(random.Random(seed).sample(range(len(records)), count))
    return [r for i, r in enumerate(records) if (i in held) == (part == "holdout")]


def squad_sample_dataset(tokenizer: Any, **kwargs: Any) -> Union[SquadChatDataset, PackedDataset]:
    """``squad_chat_dataset`` over the bundled real SQuAD 2.0 slice (626 questions,
    official format, CC BY-SA 4.0): the CPU demo's data, no download needed."""
    return squad_chat_dataset(tokenizer, source="bundled_sample", **kwargs)


squad_sample_dataset.__wrapped__ = squad_chat_dataset  # its keys are squad_chat_dataset's (config checks read them)


def answer_prompt(
    tokenizer: Any,
    record: SquadRecord,
    pause_ids: Sequence[int],
    prompt_style: str = "single_turn",
    first_reply: Optional[str] = None,
    **prompts: Any,
) -> List[int]:
    """Evaluation prompt: the conversation forced through the assistant header, the
    pause ids and ``"\n```json"``; the model writes the rest of the JSON block.

    ``multi_turn`` takes two calls: without ``first_reply`` the prompt for the yes/no
    question; with it (the model's first reply, from ``"\n```json"`` on) the
    conversation continued to the span question.
    """
    messages = squad_messages(record, prompt_style, **prompts)
    forced = ChatMessage("assistant", ANSWER_PREFIX)
    first_assistant = next(i for i, m in enumerate(messages) if m.role == "assistant")
    if prompt_style == "single_turn" or first_reply is None:
        conversation = messages[:first_assistant] + [forced]
    else:
        conversation = messages[:first_assistant] + [ChatMessage("assistant", first_reply)] + [
            messages[first_assistant + 1], forced]
    tokens, _ = tokenize_chat(tokenizer, conversation, pause_ids, add_last_end=False)
    return tokens
