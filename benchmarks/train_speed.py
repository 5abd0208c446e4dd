"""Training speed on real weights: examples per second of the SmolLM2 demo config, and what
packing, sorting by length and bf16 could buy.

    python benchmarks/train_speed.py [--steps 12] [--phase lora]

One command, a fresh `tune run blah_qlora` process per variant, the same config
(smollm2_135m_blah: real SmolLM2-135M-Instruct weights, bundled_pool split train, 5 pause
tokens), seed, data order and step count (phase lora trains the pause rows with the adapters,
lora.train_pause_embeddings=true, since no embed phase ran before it):

  bf16 padded    the shipped setting: batches of 4 shuffled examples, padded to the longest
  fp32 padded    the same in fp32 (what bf16 bought)
  bf16 packed    torchtune's PackedDataset (dataset.packed=true), packs of max_seq_len tokens,
                 batch size chosen so a step sees about as many examples

Examples/s = torchtune's own metric, supervised tokens/s (median of the steps after the first
3), divided by the mean supervised tokens of an example of the dataset: every variant trains the
same examples, so this is their examples/s. Sorting by length is not run: it can only remove
padding, so the padding share of shuffled batches (printed) is an upper bound on what it buys.
"""

import argparse
import os
import statistics
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from recipe_throughput import read_log, run  # noqa: E402

WARMUP = 3


def padding_share(lengths, batch_size, seed=0):
    """Share of the tokens of shuffled batches that are padding, and the same with sorted batches."""
    import random

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = sum(lengths)

    def padded(idx):
        return sum(max(lengths[i] for i in idx[k:k + batch_size]) * len(idx[k:k + batch_size])
                   for k in range(0, len(idx), batch_size))

    return 1 - real / padded(order), 1 - real / padded(sorted(order, key=lambda i: lengths[i]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--phase", choices=["embed", "lora"], default="lora")
    p.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "smollm2_135m_blah.yaml"))
    p.add_argument("--pack-len", type=int, default=1440, help="max_seq_len of a pack (4 examples of ~355 tokens)")
    args = p.parse_args()

    from torchtune import config as tt_config
    from omegaconf import OmegaConf

    with open(args.config) as f:
        base = yaml.safe_load(f)
    cfg = OmegaConf.create(base)
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    dataset = tt_config.instantiate(cfg.dataset, tokenizer)
    lengths = [len(dataset[i]["tokens"]) for i in range(len(dataset))]
    supervised = [sum(1 for m in dataset[i]["labels"] if m != -100) for i in range(len(dataset))]
    mean_supervised = statistics.mean(supervised)
    batch = base[args.phase]["batch_size"]
    shuffled, sorted_share = padding_share(lengths, batch)

    with tempfile.TemporaryDirectory() as root:
        def variant(name, dtype, packed, batch_size, max_seq_len):
            c = yaml.safe_load(yaml.safe_dump(base))
            c.update(output_dir=os.path.join(root, name), phases=[args.phase], dtype=dtype, seed=0)
            c[args.phase].update(max_steps=args.steps, batch_size=batch_size, save_every_n_steps=None)
            c["dataset"]["packed"] = packed
            c["tokenizer"]["max_seq_len"] = max_seq_len
            c["checkpointer"]["output_dir"] = c["output_dir"]
            c["metric_logger"]["log_dir"] = os.path.join(c["output_dir"], "logs")
            c["pause_tokens"] = base["pause_tokens"]
            c["dataset"]["pause_tokens"] = base["pause_tokens"]
            if args.phase == "lora":  # no embed phase ran here: the pause rows train with the adapters
                c["lora"]["train_pause_embeddings"] = True
            return c

        per_pack = max(1, args.pack_len // max(lengths))  # at least this many examples in every pack
        variants = {
            "bf16 padded": variant("bf16_padded", "bf16", False, batch, base["tokenizer"]["max_seq_len"]),
            "fp32 padded": variant("fp32_padded", "fp32", False, batch, base["tokenizer"]["max_seq_len"]),
            "bf16 packed": variant("bf16_packed", "bf16", True, max(1, batch // per_pack), args.pack_len),
        }
        results = {}
        for name, c in variants.items():
            print(f"running {name} ...", flush=True)
            rss = run("blah_qlora", c, root)
            rows = read_log(c["metric_logger"]["log_dir"], f"{args.phase}/")[WARMUP:]
            tps = statistics.median(r["tokens_per_second_per_gpu"] for r in rows)
            results[name] = (tps, rss)

    print(f"SmolLM2-135M-Instruct, {os.path.basename(args.config)}, phase {args.phase}, {args.steps} steps, "
          f"median of steps {WARMUP + 1}+, {os.cpu_count()} CPU threads")
    print(f"  {len(lengths)} examples, {statistics.mean(lengths):.0f} tokens each on average "
          f"(min {min(lengths)}, max {max(lengths)}), {mean_supervised:.1f} supervised")
    print(f"  padding share of shuffled batches of {batch}: {shuffled:.1%}; of length-sorted batches: "
          f"{sorted_share:.1%} (so sorting could buy at most {1 / (1 - shuffled) * (1 - sorted_share) - 1:.1%})")
    ref = results["bf16 padded"][0]
    for name, (tps, rss) in results.items():
        print(f"  {name:<12} {tps / mean_supervised:6.2f} examples/s  {tps:7.1f} supervised tokens/s  "
              f"x{tps / ref:.2f} of bf16 padded   max RSS {rss:,.0f} MiB")


if __name__ == "__main__":
    main()
