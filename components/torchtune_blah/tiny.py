"""Tiny Llama 3-architecture models and tokenizers, made here, for tests and the CPU demo.

Nothing is downloaded: the tokenizer is a byte-level BPE trained (with Hugging
Face ``tokenizers``, deterministic) on the bundled SQuAD 2.0 sample and written
in tiktoken's format, so torchtune's own ``Llama3Tokenizer`` loads it. Its special
tokens keep Llama 3's layout, shifted down to a small vocabulary: the same names,
the same order, reserved tokens after them, and ``<|image|>`` sitting exactly at
the model's vocabulary size as it does for Llama 3 8B (128256).

The model dimensions are the smallest that NF4 (QLoRA) accepts: every quantized
weight has a multiple of 16,384 elements (embed_dim 256, intermediate 512).
"""

import base64
import json
import os
from typing import Dict, Iterator, Optional

TINY_BASE_VOCAB = 1024  # BPE tokens, bytes included
TINY_NUM_RESERVED = 19  # <|reserved_special_token_2|> .. _20|>
TINY_VOCAB_SIZE = TINY_BASE_VOCAB + 13 + TINY_NUM_RESERVED  # embedding rows; <|image|> sits here
TINY_MODEL_ARGS = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512,
                       max_seq_len=2048)


def squad_sample_path() -> str:
    """The bundled real SQuAD 2.0 slice (official format, 626 questions; CC BY-SA 4.0)."""
    from torchtune_blah.data.squad import bundled_path

    return bundled_path("bundled_sample")


def tiny_special_tokens() -> Dict[str, int]:
    """Llama 3's special tokens at Llama 3's offsets, moved from 128000 to TINY_BASE_VOCAB."""
    from torchtune.models.llama3._tokenizer import SPECIAL_TOKENS

    special = {name: TINY_BASE_VOCAB + (i - 128000) for name, i in SPECIAL_TOKENS.items() if name != "<|image|>"}
    for k in range(TINY_NUM_RESERVED):
        special[f"<|reserved_special_token_{2 + k}|>"] = TINY_BASE_VOCAB + 13 + k
    special["<|image|>"] = TINY_VOCAB_SIZE
    return special


def _training_texts() -> Iterator[str]:
    from torchtune_blah.data.squad import MULTI_TURN_FIRST_PROMPT, MULTI_TURN_SECOND_PROMPT, SINGLE_TURN_PROMPT, SYSTEM_PROMPT

    yield from (SYSTEM_PROMPT, SINGLE_TURN_PROMPT, MULTI_TURN_FIRST_PROMPT, MULTI_TURN_SECOND_PROMPT)
    with open(squad_sample_path(), encoding="utf-8") as f:
        squad = json.load(f)
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            yield paragraph["context"]
            for qa in paragraph["qas"]:
                yield qa["question"]
                for answer in qa["answers"]:
                    yield '"answer": "' + answer["text"] + '"'


def write_tiny_tiktoken(path: str) -> str:
    """Train the tiny BPE and write it as a tiktoken file (``base64(bytes) rank`` lines).

    Ranks follow the BPE's merge order, which is what tiktoken's merging needs.
    Atomic and idempotent: an existing file is left as it is.
    """
    if os.path.isfile(path):
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from torchtune_blah.hf_tokenizer import bytes_to_unicode

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BASE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, special_tokens=[],
    )
    tokenizer.train_from_iterator(_training_texts(), trainer=trainer)
    # Byte-level BPE spells bytes as printable characters; map them back to bytes.
    printable = bytes_to_unicode()
    to_byte = {c: b for b, c in printable.items()}
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    lines = []
    for rank, (token, _) in enumerate(vocab):
        raw = bytes(to_byte[c] for c in token)
        lines.append(f"{base64.b64encode(raw).decode()} {rank}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def tiny_llama3_tokenizer(path: str, max_seq_len: Optional[int] = None):
    """torchtune's Llama3Tokenizer over the tiny BPE at ``path`` (trained there on first use)."""
    from torchtune.models.llama3 import Llama3Tokenizer

    write_tiny_tiktoken(path)
    return Llama3Tokenizer(path, special_tokens=tiny_special_tokens(), max_seq_len=max_seq_len)


def tiny_llama3(tie_word_embeddings: bool = False, **overrides):
    """A 2-layer Llama 3 decoder over the tiny vocabulary; tied embeddings build it as Llama 3.2."""
    from torchtune.models.llama3._component_builders import llama3
    from torchtune.models.llama3_2._component_builders import llama3_2

    args = {"vocab_size": TINY_VOCAB_SIZE, **TINY_MODEL_ARGS, **overrides}
    return llama3_2(**args, tie_word_embeddings=True) if tie_word_embeddings else llama3(**args)


def tiny_qlora_llama3(
    lora_attn_modules=("q_proj", "k_proj", "v_proj", "output_proj"),
    apply_lora_to_mlp: bool = True,
    apply_lora_to_output: bool = True,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    quantize_base: bool = True,
    tie_word_embeddings: bool = False,
    **overrides,
):
    """The tiny decoder with NF4 base weights and LoRA (default: every linear layer, as llama-squad).
    ``tie_word_embeddings``: built as Llama 3.2 (the output reads the embedding table; no LoRA on it)."""
    from torchtune.models.llama3._component_builders import lora_llama3
    from torchtune.models.llama3_2._component_builders import lora_llama3_2

    kwargs = dict(
        lora_attn_modules=list(lora_attn_modules), apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output, vocab_size=TINY_VOCAB_SIZE, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, quantize_base=quantize_base,
        **{**TINY_MODEL_ARGS, **overrides},
    )
    return lora_llama3_2(**kwargs, tie_word_embeddings=True) if tie_word_embeddings else lora_llama3(**kwargs)


def write_tiny_hf_checkpoint(checkpoint_dir: str, seed: int = 0, tie_word_embeddings: bool = False) -> str:
    """A random-initialised tiny Llama 3 in Hugging Face's layout (``model.safetensors`` +
    ``config.json``), as ``tune download`` would leave a real one. Deterministic for a
    seed, made once (existing files are kept), and it leaves the global RNG untouched.
    ``tie_word_embeddings``: no ``lm_head.weight`` (the output reads the embedding table)."""
    import torch
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    from torchtune_blah.checkpointing import atomic_json, atomic_write

    config_path = os.path.join(checkpoint_dir, "config.json")
    if os.path.isfile(config_path) and os.path.isfile(os.path.join(checkpoint_dir, "model.safetensors")):
        return checkpoint_dir
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_llama3(tie_word_embeddings=tie_word_embeddings)
    args = TINY_MODEL_ARGS
    hf = tune_to_hf({k: v.contiguous() for k, v in model.state_dict().items()},
                    num_heads=args["num_heads"], num_kv_heads=args["num_kv_heads"], dim=args["embed_dim"])
    atomic_write(os.path.join(checkpoint_dir, "model.safetensors"),
                 lambda tmp: save_file(hf, tmp, metadata={"format": "pt"}))
    atomic_json({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": args["embed_dim"], "intermediate_size": args["intermediate_dim"],
        "num_hidden_layers": args["num_layers"], "num_attention_heads": args["num_heads"],
        "num_key_value_heads": args["num_kv_heads"], "max_position_embeddings": args["max_seq_len"],
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
    }, config_path)
    return checkpoint_dir


def tiny_llama3_checkpointer(checkpoint_dir: str, output_dir: str, seed: int = 0, **kwargs):
    """torchtune's ``FullModelHFCheckpointer`` over the tiny base model, created on first use."""
    from torchtune.training import FullModelHFCheckpointer

    write_tiny_hf_checkpoint(checkpoint_dir, seed=seed)
    return FullModelHFCheckpointer(checkpoint_dir=checkpoint_dir, checkpoint_files=["model.safetensors"],
                                   model_type="LLAMA3", output_dir=output_dir, **kwargs)
