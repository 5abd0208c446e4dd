"""How one model family writes a conversation as token ids: the one interface the dataset,
evaluation and generation share.

"Render these messages, put these ids after the assistant header, tell me the end-of-turn
ids." Two families are known, each from the tokenizer's special tokens:

- ``Llama3ChatFormat``: torchtune's Llama 3 tokenizers (tiktoken)::

      <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>

- ``ChatMLChatFormat``: Qwen2.5 (torchtune's ``qwen2_5_tokenizer``) and SmolLM2
  (``torchtune_blah.models.smollm2.smollm2_tokenizer``)::

      <|im_start|>{role}\\n{content}<|im_end|>\\n

Contents are trimmed in every format, as llama-squad's Llama 3 template did (so llama-squad's
system prompt loses its trailing newline everywhere). Pause ids go right after the
assistant header, and the reply after them is encoded on its own: the pause ids split the
text exactly as special tokens split it in transformers' ``apply_chat_template``, so the
ids equal that of the same messages with the pause tokens as special tokens
(``tests/test_chat_formats.py``). The supervised end of an assistant turn is the format's
end-of-turn token (``<|eot_id|>``, ``<|im_end|>``); ChatML's newline after it is not.
"""

from typing import Any, Dict, List, Optional, Sequence

from torchtune.data import Message


class ChatFormat:
    """Base class: subclasses fill in ``start_ids``, ``end_of_turn_ids``, ``after_turn_ids``,
    ``end_ids``, ``message`` and ``assistant_header``."""

    name = "base"
    start_ids: List[int] = []  # before the first message (Llama 3: <|begin_of_text|>)
    end_of_turn_ids: List[int] = []  # closes an assistant reply; supervised
    after_turn_ids: List[int] = []  # after the end of turn, not supervised (ChatML: "\n")
    end_ids: List[int] = []  # ids that end a reply when generated (end of turn, end of text)
    default_system_prompt: Optional[str] = None  # what the chat template adds without a system turn

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_bos=False, add_eos=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids (generated ones: special tokens left out)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def message(self, role: str, content: str) -> List[int]:
        raise NotImplementedError

    def assistant_header(self) -> List[int]:
        raise NotImplementedError

    def token_texts(self) -> List[str]:
        """The text of every id (special tokens by name); for rules such as "stop after '}'"."""
        raise NotImplementedError


class Llama3ChatFormat(ChatFormat):
    name = "llama3"

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        self.start_ids = [tokenizer.bos_id]
        self.end_of_turn_ids = [tokenizer.eot_id]
        self.end_ids = [tokenizer.eot_id, tokenizer.eos_id]

    def message(self, role: str, content: str) -> List[int]:
        # torchtune's Llama 3 tokenizer trims the content, as Llama 3's chat template does.
        return self.tokenizer.tokenize_message(Message(role=role, content=content))

    def assistant_header(self) -> List[int]:
        return self.tokenizer.tokenize_message(Message(role="assistant", content=""), add_end_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), truncate_at_eos=False, skip_special_tokens=skip_special_tokens)

    def token_texts(self) -> List[str]:
        encoding = self.tokenizer.tt_model.tt_model  # the tiktoken Encoding under torchtune's tokenizer
        texts = []
        for i in range(encoding.n_vocab):
            try:
                texts.append(encoding.decode_single_token_bytes(i).decode("utf-8", errors="replace"))
            except KeyError:  # ids between the BPE ranks and the special tokens
                texts.append("")
        return texts


QWEN2_5_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class ChatMLChatFormat(ChatFormat):
    name = "chatml"

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        special = tokenizer.special_tokens
        self.im_start, self.im_end = special["<|im_start|>"], special["<|im_end|>"]
        self.start_ids = []
        self.end_of_turn_ids = [self.im_end]
        self.after_turn_ids = self.encode("\n")
        ends = {self.im_end, special.get("<|endoftext|>"), getattr(tokenizer, "eos_id", None)}
        self.end_ids = sorted(i for i in ends if i is not None)
        self.default_system_prompt = getattr(tokenizer, "default_system_prompt", None)
        if self.default_system_prompt is None and type(tokenizer).__name__ == "Qwen2_5Tokenizer":
            self.default_system_prompt = QWEN2_5_DEFAULT_SYSTEM_PROMPT

    def message(self, role: str, content: str) -> List[int]:
        # The text between two special tokens is one segment, as in apply_chat_template.
        return [self.im_start] + self.encode(f"{role}\n{content.strip()}") + [self.im_end] + self.after_turn_ids

    def assistant_header(self) -> List[int]:
        return [self.im_start] + self.encode("assistant\n")

    def token_texts(self) -> List[str]:
        hf = getattr(self.tokenizer, "hf", None)  # our ChatMLTokenizer: decode in Rust, all at once
        if hf is not None:
            size = hf.tokenizer.get_vocab_size(with_added_tokens=True)
            return hf.tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        size = max(self.tokenizer.special_tokens.values()) + 1
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(size)]


def chat_format(tokenizer: Any) -> ChatFormat:
    """The chat format of a torchtune tokenizer (a ``ChatFormat`` is returned as it is)."""
    if isinstance(tokenizer, ChatFormat):
        return tokenizer
    special: Dict[str, int] = getattr(tokenizer, "special_tokens", None) or {}
    if "<|start_header_id|>" in special and hasattr(tokenizer, "tokenize_message"):
        return Llama3ChatFormat(tokenizer)
    if "<|im_start|>" in special and "<|im_end|>" in special and hasattr(tokenizer, "encode"):
        return ChatMLChatFormat(tokenizer)
    raise TypeError(
        f"{type(tokenizer).__name__} has no chat format this package knows: it needs the special tokens "
        "<|start_header_id|>/<|eot_id|> (Llama 3: torchtune.models.llama3.llama3_tokenizer) or "
        "<|im_start|>/<|im_end|> (ChatML: torchtune.models.qwen2_5.qwen2_5_tokenizer, "
        "torchtune_blah.models.smollm2.smollm2_tokenizer) in tokenizer.special_tokens, and an "
        f"encode(text, add_bos, add_eos) method; it has special tokens {sorted(special)[:8]}")


def render_chat(fmt: ChatFormat, messages: Sequence[Any], pause_ids: Sequence[int] = (),
                add_last_end: bool = True):
    """Token ids and one ``supervised`` flag per token (True: trained on) for ``messages`` (objects
    with ``role`` and ``content``).

    Args:
        messages: system/user/assistant turns; assistant contents are the reply after the
            pause tokens.
        pause_ids: inserted after every assistant header.
        add_last_end: False leaves the last assistant turn open (no end of turn), for
            prompting a model with a forced reply prefix.
    """
    tokens, supervised = list(fmt.start_ids), [False] * len(fmt.start_ids)
    if fmt.default_system_prompt and (not messages or messages[0].role != "system"):
        ids = fmt.message("system", fmt.default_system_prompt)
        tokens += ids
        supervised += [False] * len(ids)
    for n, message in enumerate(messages):
        if message.role != "assistant":
            ids = fmt.message(message.role, message.content)
            tokens += ids
            supervised += [False] * len(ids)
            continue
        header = fmt.assistant_header()
        reply = fmt.encode(message.content)
        closed = add_last_end or n < len(messages) - 1
        end = fmt.end_of_turn_ids if closed else []
        after = fmt.after_turn_ids if closed else []
        tokens += header + list(pause_ids) + reply + end + after
        supervised += ([False] * (len(header) + len(pause_ids)) + [True] * (len(reply) + len(end))
                       + [False] * len(after))
    return tokens, supervised
