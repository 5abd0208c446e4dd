"""What building the training dataset costs at llama-squad's scale (130,319 SQuAD 2.0 training questions).

    python benchmarks/dataset_scale.py                      # tiny tokenizer, 130,319 questions
    python benchmarks/dataset_scale.py --questions 20000
    python benchmarks/dataset_scale.py --llama3             # also Meta's Llama 3 tokenizer (PyPI: llama-models)

The bundled SQuAD 2.0 questions (dev-set sample + training slice, 1,217) are replicated with new
ids to the requested count and written as flat JSONL; each measurement builds
``squad_chat_dataset`` from it in a fresh child process (the way a recipe does: source json,
5 append-mode pause tokens, max_seq_len) and reports wall time and the peak RSS above what the
process held before building, plus the bytes per token that costs. The token-count ratio of the
tiny tokenizer to Llama 3's on the same text says how the tiny numbers scale to Llama 3.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA_MODELS_WHEEL = "llama-models==0.3.0"


def write_questions(path: str, n: int) -> None:
    from torchtune_blah.data.squad import load_squad_records

    base = load_squad_records("bundled_train") + load_squad_records("bundled_sample")
    with open(path, "w") as f:
        for i in range(n):
            r = base[i % len(base)]
            f.write(json.dumps({"id": f"{r.id}-{i}", "context": r.context, "question": r.question,
                                "answers": list(r.answers)}) + "\n")


def llama3_tokenizer_path(cache: str) -> str:
    """Meta's Llama 3 tiktoken file, from the llama-models wheel on PyPI (no hub)."""
    import zipfile

    path = os.path.join(cache, "llama3_tokenizer.model")
    if os.path.isfile(path):
        return path
    os.makedirs(cache, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache, LLAMA_MODELS_WHEEL],
                   check=True)
    wheel = next(os.path.join(cache, f) for f in os.listdir(cache) if f.startswith("llama_models") and f.endswith(".whl"))
    with zipfile.ZipFile(wheel) as z, open(path + ".tmp", "wb") as out:
        out.write(z.read("llama_models/llama3/tokenizer.model"))
    os.replace(path + ".tmp", path)
    return path


CHILD = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
from torchtune_blah.data import squad_chat_dataset
if args["tokenizer"] == "tiny":
    from torchtune_blah.tiny import TINY_VOCAB_SIZE, tiny_llama3_tokenizer
    tok, vocab = tiny_llama3_tokenizer(args["path"]), TINY_VOCAB_SIZE
else:
    from torchtune.models.llama3 import llama3_tokenizer
    tok, vocab = llama3_tokenizer(args["path"]), 128256
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
before = rss_mib()
t0 = time.perf_counter()
ds = squad_chat_dataset(tok, source="json", data_files=args["data"], max_seq_len=args["max_seq_len"],
                        pause_tokens={"num": 5, "mode": "append", "vocab_size": vocab})
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
tokens = sum(len(ds[i]["tokens"]) for i in range(len(ds)))
print(json.dumps({"seconds": seconds, "rss_before_mib": before, "peak_mib": peak, "samples": len(ds),
                  "skipped": len(ds.skipped_ids), "tokens": tokens}))
"""


def measure(tokenizer: str, path: str, data: str, max_seq_len: int) -> dict:
    args = json.dumps({"tokenizer": tokenizer, "path": path, "data": data, "max_seq_len": max_seq_len})
    out = subprocess.run([sys.executable, "-c", CHILD, args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def token_ratio(tiny_path: str, llama3_path: str) -> float:
    from torchtune.models.llama3 import llama3_tokenizer

    from torchtune_blah.data.squad import load_squad_records
    from torchtune_blah.tiny import tiny_llama3_tokenizer

    tiny, llama = tiny_llama3_tokenizer(tiny_path), llama3_tokenizer(llama3_path)
    texts = [t for r in load_squad_records("bundled_train") for t in (r.context, r.question)]
    count = lambda tok: sum(len(tok.encode(t, add_bos=False, add_eos=False)) for t in texts)  # noqa: E731
    return count(tiny) / count(llama)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=130319)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--llama3", action="store_true", help="also measure with Meta's Llama 3 tokenizer")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/torchtune_blah"))
    args = parser.parse_args()
    from torchtune_blah.tiny import write_tiny_tiktoken

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "train.jsonl")
        write_questions(data, args.questions)
        tiny = write_tiny_tiktoken(os.path.join(tmp, "tiny.model"))
        rows = [("tiny", measure("tiny", tiny, data, args.max_seq_len))]
        ratio = None
        if args.llama3:
            llama = llama3_tokenizer_path(args.cache)
            rows.append(("llama3", measure("llama3", llama, data, args.max_seq_len)))
            ratio = token_ratio(tiny, llama)
    print(f"squad_chat_dataset, {args.questions:,} questions, max_seq_len {args.max_seq_len}, "
          f"5 pause tokens, single_turn")
    print("| tokenizer | samples | skipped | tokens | build s | RSS growth MiB | bytes/token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        growth = r["peak_mib"] - r["rss_before_mib"]
        print(f"| {name} | {r['samples']:,} | {r['skipped']:,} | {r['tokens']:,} | {r['seconds']:.1f} | "
              f"{growth:,.0f} | {growth * 2**20 / r['tokens']:.1f} |")
    if ratio is not None:
        print(f"tiny / Llama 3 token count on the same text (bundled training contexts and questions): {ratio:.2f}")


if __name__ == "__main__":
    main()
