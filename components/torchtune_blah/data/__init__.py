"""SQuAD 2.0 as chat with pause tokens and answer-only loss."""

from torchtune_blah.data.chat import SquadChatDataset, answer_only_labels, squad_chat_dataset, squad_sample_dataset, tokenize_chat
from torchtune_blah.data.squad import (
    ANSWER_PREFIX,
    NO_ANSWER,
    PROMPT_STYLES,
    ChatMessage,
    SquadRecord,
    SquadRecordError,
    answer_block,
    load_squad_records,
    record_from_dict,
    squad_messages,
)

__all__ = [
    "ANSWER_PREFIX", "NO_ANSWER", "PROMPT_STYLES", "ChatMessage", "SquadChatDataset", "SquadRecord",
    "SquadRecordError", "answer_block", "answer_only_labels", "load_squad_records", "record_from_dict",
    "squad_chat_dataset", "squad_messages", "squad_sample_dataset", "tokenize_chat",
]
