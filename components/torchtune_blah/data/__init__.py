"""SQuAD 2.0 as chat with pause tokens and answer-only loss."""

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

_CHAT = ("SquadChatDataset", "answer_only_labels", "squad_chat_dataset", "squad_sample_dataset", "tokenize_chat")


def __getattr__(name):
    """The dataset builders (``torchtune_blah.data.squad_chat_dataset``, as configs name them) are
    imported on first use: they need torchtune, the records (``data.squad``) do not, and the review
    tool reads records without torch's import."""
    if name in _CHAT:
        from torchtune_blah.data import chat

        return getattr(chat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
