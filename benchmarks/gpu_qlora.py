"""QLoRA on Llama 3 8B shapes, one GPU: our phases vs torchtune's recipe, and blah_eval's speed.

    python benchmarks/gpu_qlora.py                       # Llama 3 8B shapes on cuda, bf16 (< 8 min on one GPU)
    python benchmarks/gpu_qlora.py --shape tiny --device cpu --steps 3    # the same path, end to end, on a CPU

No downloads: a random-weight checkpoint of the chosen shape is written in Hugging Face's layout
(bf16 safetensors; 16 GB for 8B), the tokenizer is the tiny one trained here, the data the bundled
SQuAD 2.0 questions. Every training run is a fresh `tune run` process on the same batches (shuffle
off, same seed), as llama3_8b_blah configures it: NF4 base, LoRA r64 on every linear layer,
activation checkpointing, batch 1 x 16 accumulated, bf16:

  torchtune   lora_finetune_single_device, no pause tokens
  lora        blah_qlora phases=[lora], no pause tokens (the same training)
  embed       blah_qlora phases=[embed], 5 pause tokens (only the pause rows train), the prompt
              before the pause ids without autograd (embed.backward_from_first_pause, as configured)
  embed_full  the same with the full backward pass

Tokens/s is torchtune's metric (supervised tokens per second), median after warm-up; peak memory
is torch's peak allocated memory (CUDA) or the process's max RSS (CPU). Beside it, blah_estimate's
peak for the same run config at the longest sequence those steps see (`tune run blah_estimate`,
on fake tensors, computed by CPU processes while the GPU trains): the first GPU run checks the
estimator too (docs/training.md#what-fits-where). Then blah_eval's answering
(KV cache, stop rule) on 32 questions at batch 1, 8 and 32 with the lora run's model, and the
output projection on strided vs contiguous chunks at batch 4 (output_chunks.py). Torchtune's
published anchors for QLoRA Llama 3.1 8B on one RTX 4090: 7.4 GiB peak, 2,413 tokens/s.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from recipe_throughput import read_log, run  # noqa: E402  (one way to launch and read a recipe)

SHAPES = {
    "8b": dict(vocab_size=128256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
               intermediate_dim=14336, max_seq_len=8192),
    "tiny": dict(vocab_size=128256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512,
                 max_seq_len=8192),
}
WARMUP = 2


def write_random_checkpoint(folder: str, shape: dict, device: str) -> None:
    """A random Llama 3 of ``shape`` as Hugging Face bf16 safetensors, one shard per layer."""
    import json

    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    d, inter, v = shape["embed_dim"], shape["intermediate_dim"], shape["vocab_size"]
    kv = shape["num_kv_heads"] * d // shape["num_heads"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    weight_map, shards = {}, []
    outer = {"model.embed_tokens.weight": rand(v, d), "lm_head.weight": rand(v, d),
             "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    shards.append(outer)
    for i in range(shape["num_layers"]):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
                       p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
                       p + "mlp.gate_proj.weight": rand(inter, d), p + "mlp.up_proj.weight": rand(inter, d),
                       p + "mlp.down_proj.weight": rand(d, inter),
                       p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16)})
    files = []
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        files.append(name)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": v, "hidden_size": d,
                   "intermediate_size": inter, "num_hidden_layers": shape["num_layers"],
                   "num_attention_heads": shape["num_heads"], "num_key_value_heads": shape["num_kv_heads"],
                   "max_position_embeddings": shape["max_seq_len"], "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, f)
    return files


def configs(root: str, shape: dict, files, args) -> dict:
    """The three runs, from llama3_8b_blah's settings with the random base and tiny tokenizer."""
    with open(os.path.join(os.path.dirname(HERE), "configs", "llama3_8b_blah.yaml")) as f:
        base = yaml.safe_load(f)
    model = {"_component_": "torchtune.models.llama3._component_builders.lora_llama3",
             "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
             "apply_lora_to_output": True, "lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.0,
             "quantize_base": True, **shape}
    shared = {
        "model": model, "device": args.device, "dtype": "bf16", "seed": 0, "shuffle": False,
        "tokenizer": {"_component_": "torchtune_blah.tiny.tiny_llama3_tokenizer",
                      "path": os.path.join(root, "tokenizer.model"), "max_seq_len": 4096},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "enable_activation_checkpointing": True, "compile": False, "log_every_n_steps": 1,
        "log_peak_memory_stats": args.device == "cuda", "save_adapter_weights_only": True,
        "resume_from_checkpoint": False,
    }
    steps, accum = args.steps, args.accum

    def checkpointer(out):
        return {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": os.path.join(root, "base"),
                "checkpoint_files": files, "model_type": "LLAMA3", "output_dir": out}

    def logger(out):
        return {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": os.path.join(out, "logs")}

    def ours(name, phase, num_pause, **phase_extra):
        out = os.path.join(root, name)
        pause = {"num": num_pause, "mode": "append", "vocab_size": shape["vocab_size"]}
        cfg = dict(shared, output_dir=out, phases=[phase], pause_tokens=pause, checkpointer=checkpointer(out),
                   metric_logger=logger(out), validation=None,
                   dataset={"_component_": "torchtune_blah.data.squad_sample_dataset", "pause_tokens": pause})
        cfg[phase] = dict(base[phase], max_steps=steps, batch_size=1, gradient_accumulation_steps=accum,
                          save_every_n_steps=None, **phase_extra)
        return cfg

    out = os.path.join(root, "torchtune")
    theirs = dict(shared, output_dir=out, checkpointer=checkpointer(out), metric_logger=logger(out), batch_size=1,
                  epochs=1, max_steps_per_epoch=steps, gradient_accumulation_steps=accum,
                  optimizer=base["lora"]["optimizer"], clip_grad_norm=base["lora"]["clip_grad_norm"],
                  lr_scheduler={"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                                "num_warmup_steps": 1},
                  enable_activation_offloading=False,
                  dataset={"_component_": "torchtune_blah.data.squad_sample_dataset", "pause_tokens": {"num": 0}})
    if args.device != "cuda":  # bitsandbytes' paged optimizer is CUDA-only
        for cfg in (theirs,):
            cfg["optimizer"] = {"_component_": "torch.optim.AdamW", "lr": 1e-6}
    runs = {"torchtune": ("lora_finetune_single_device", theirs), "lora": ("blah_qlora", ours("lora", "lora", 0)),
            "embed": ("blah_qlora", ours("embed", "embed", 5, backward_from_first_pause=True)),
            "embed_full": ("blah_qlora", ours("embed_full", "embed", 5, backward_from_first_pause=False))}
    if args.device != "cuda":
        runs["lora"][1]["lora"]["optimizer"] = {"_component_": "torch.optim.AdamW", "lr": 1e-6}
    return runs


def longest_sequence(root: str, shape: dict, count: int) -> int:
    """The longest of the first ``count`` training sequences (shuffle off: what the runs see)."""
    from torchtune_blah.data.chat import squad_sample_dataset
    from torchtune_blah.tiny import tiny_llama3_tokenizer

    tokenizer = tiny_llama3_tokenizer(os.path.join(root, "tokenizer.model"), max_seq_len=4096)
    dataset = squad_sample_dataset(tokenizer, pause_tokens={"num": 5, "mode": "append",
                                                            "vocab_size": shape["vocab_size"]})
    return max(len(dataset[i]["tokens"]) for i in range(min(count, len(dataset))))


def start_estimates(root: str, runs: dict, max_seq_len: int) -> dict:
    """One `tune run blah_estimate` process per blah_qlora run (CPU, in parallel with the GPU)."""
    import subprocess
    import shutil

    procs = {}
    for name, (recipe, cfg) in runs.items():
        if recipe != "blah_qlora":
            continue
        path = os.path.join(root, f"estimate_{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        out = os.path.join(root, f"estimate_{name}")
        command = [shutil.which("tune"), "run", "blah_estimate", "--config", path, f"tokenizer.max_seq_len={max_seq_len}",
                   f"reply_tokens={min(32, max_seq_len - 8)}", "eval_batch_size=1", f"estimate_dir={out}"]
        procs[name] = (subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, CUDA_VISIBLE_DEVICES="")), out)
    return procs


def read_estimates(procs: dict) -> dict:
    """GiB each run's estimate gives its phase (peak allocated, no CUDA allowance), or None."""
    import json

    peaks = {}
    for name, (proc, out) in procs.items():
        proc.wait()
        try:
            with open(os.path.join(out, "estimate.json")) as f:
                peaks[name] = json.load(f)["estimates"][0]["peak_gib"]
        except (OSError, KeyError, IndexError, ValueError):
            peaks[name] = None
    return peaks


def eval_speed(run_dir: str, device: str, batch_sizes, questions: int, max_new_tokens: int):
    """Examples/s of blah_eval's answering with the run's model, per batch size."""
    import torch
    from torchtune import config

    from torchtune_blah.data.squad import load_squad_records
    from torchtune_blah.eval.run import abstention_probe, answer_records
    from torchtune_blah.generation import stop_token_ids
    from torchtune_blah.model import load_run_model
    from torchtune_blah.run_dir import RunDir

    run_cfg = RunDir(run_dir).read_config()
    tokenizer = config.instantiate(run_cfg.tokenizer)
    model, pause = load_run_model(run_cfg, run_dir, "lora", torch.device(device), torch.bfloat16,
                                  staging_dir=os.path.join(run_dir, ".eval_staging"))
    # The tiny tokenizer names 1,057 of the 128,256 ids: a random model's other ids could not be
    # decoded, so their logits are masked (the cost is one fill per step).
    named = max(tokenizer.special_tokens.values()) + 1
    model.output.register_forward_hook(lambda module, inputs, out: out[..., named:].fill_(float("-inf")))
    records = load_squad_records("bundled_sample")[:questions]
    kwargs = dict(prompt_style="single_turn", stop_ids=stop_token_ids(tokenizer), probe=abstention_probe(tokenizer),
                  max_new_tokens=max_new_tokens)
    speeds = {}
    for batch in batch_sizes:
        for share in (True, False):  # the shared-prompt pre-fill, and the whole prompt per row
            answer_records(model, tokenizer, records[:batch], pause, share_prefix=share, **kwargs)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(0, len(records), batch):
                answer_records(model, tokenizer, records[i:i + batch], pause, share_prefix=share, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            speeds[(batch, share)] = len(records) / (time.perf_counter() - start)
    return speeds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--accum", type=int, default=16, help="micro-batches of 1 per step (the 8B config: 16)")
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--workdir", default=None, help="where the random checkpoint goes (default: a temp folder)")
    args = p.parse_args()
    shape = SHAPES[args.shape]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as root:
        from torchtune_blah.tiny import write_tiny_tiktoken

        files = write_random_checkpoint(os.path.join(root, "base"), shape, args.device)
        write_tiny_tiktoken(os.path.join(root, "tokenizer.model"))
        print(f"random {args.shape} checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = configs(root, shape, files, args)
        longest = longest_sequence(root, shape, args.steps * args.accum)
        estimates = start_estimates(root, runs, longest)
        results = {}
        for name, (recipe, cfg) in runs.items():
            rss = run(recipe, cfg, root)
            prefix = "" if name == "torchtune" else f"{cfg['phases'][0]}/"  # our recipe logs <phase>/...
            rows = read_log(cfg["metric_logger"]["log_dir"], prefix)
            steady = rows[WARMUP:] or rows
            tps = statistics.median(r["tokens_per_second_per_gpu"] for r in steady)
            peak = max(r.get("peak_memory_alloc", 0.0) for r in rows) if args.device == "cuda" else rss
            results[name] = (tps, peak)
            print(f"  {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        speeds = eval_speed(os.path.join(root, "lora"), args.device, (1, 8, 32), args.questions, args.max_new_tokens)
        estimated = read_estimates(estimates)
    unit = "GiB peak allocated" if args.device == "cuda" else "MiB max RSS"
    print(f"\nLlama 3 {args.shape} shapes (random weights), NF4 + LoRA r64, activation checkpointing, bf16, "
          f"batch 1 x {args.accum}, {args.steps} steps, {args.device}; {time.perf_counter() - t0:.0f} s in all")
    print(f"| run | tokens/s | {unit} | blah_estimate GiB at {longest} tokens |")
    print("|---|---:|---:|---:|")
    for name, (tps, peak) in results.items():
        est = estimated.get(name)
        print(f"| {name} | {tps:,.1f} | {peak:,.2f} | {'' if est is None else f'{est:.2f}'} |")
    print(f"lora / torchtune tokens/s = {results['lora'][0] / results['torchtune'][0]:.3f}; "
          f"embed step time / lora = {results['lora'][0] / results['embed'][0]:.3f} (embed.backward_from_first_pause), "
          f"{results['lora'][0] / results['embed_full'][0]:.3f} (the full backward pass)")
    print("| blah_eval batch | examples/s, shared prefix | whole prompt |")
    print("|---:|---:|---:|")
    for batch in sorted({b for b, _ in speeds}):
        print(f"| {batch} | {speeds[(batch, True)]:.2f} | {speeds[(batch, False)]:.2f} |")
    print("anchors (torchtune, QLoRA Llama 3.1 8B, one RTX 4090): 7.4 GiB peak, 2,413 tokens/s")
    to_gib = 1.0 if args.device == "cuda" else 1 / 1024  # CPU: max RSS, whole process (not comparable)
    print("estimated_gib=" + ",".join(f"{k}:{v}" for k, v in estimated.items()) + " measured_gib="
          + ",".join(f"{k}:{results[k][1] * to_gib:.2f}" for k in estimated) + f" longest_tokens={longest}")
    # Batch 4 (the 8B config's batch is 1, where chunks are contiguous anyway): does torchtune's
    # strided chunking cost on this device what it costs on a CPU?
    import subprocess

    subprocess.run([sys.executable, os.path.join(HERE, "output_chunks.py"), "--device", args.device,
                    "--dim", str(shape["embed_dim"]), "--vocab", str(shape["vocab_size"])], check=True)


if __name__ == "__main__":
    main()
