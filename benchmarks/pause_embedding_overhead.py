"""Forward+backward cost of PauseEmbedding against plain nn.Embedding lookups.

    python benchmarks/pause_embedding_overhead.py [--vocab 128256] [--dim 4096] [--tokens 4096] [--dtype bf16]

Compares, on the same token batch (5 pause tokens per sequence, like training):
  trainable  nn.Embedding(vocab + n) with a trainable table: llama-squad's way (extend the
             table, train it); backward builds a dense vocab x dim gradient.
  frozen     nn.Embedding(vocab) frozen, the plain lookup a LoRA model does anyway
             (backward has nothing to do for it).
  pause      PauseEmbedding: frozen base + trainable (n x dim) rows.
Each is timed as forward + backward of (output * upstream_grad).sum(), median of --repeat.
"""
import argparse
import statistics
import time

import torch
from torch import nn

from torchtune_blah.pause import PauseEmbedding, pause_tokens


def timed(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096, help="batch 2 x seq 2048 by default")
    p.add_argument("--num-pause", type=int, default=5)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)

    seq = 2048 if args.tokens % 2048 == 0 else args.tokens
    tokens = torch.randint(0, args.vocab, (args.tokens // seq, seq))
    tokens[:, 100:100 + args.num_pause] = torch.arange(args.vocab, args.vocab + args.num_pause)
    upstream = torch.randn(*tokens.shape, args.dim, dtype=dtype)

    trainable = nn.Embedding(args.vocab + args.num_pause, args.dim, dtype=dtype)
    frozen = nn.Embedding(args.vocab, args.dim, dtype=dtype).requires_grad_(False)
    frozen.weight.data.copy_(trainable.weight.data[: args.vocab])
    spec = pause_tokens(num=args.num_pause, vocab_size=args.vocab)
    pause = PauseEmbedding(frozen, spec, torch.zeros(args.num_pause, args.dim))

    def step_trainable():
        trainable.weight.grad = None
        (trainable(tokens) * upstream).sum().backward()

    def step_frozen():
        out = frozen(tokens.clamp(max=args.vocab - 1)).requires_grad_()
        (out * upstream).sum().backward()

    def step_pause():
        pause.pause_weight.grad = None
        (pause(tokens) * upstream).sum().backward()

    results = {name: timed(fn, args.repeat) for name, fn in
               [("trainable", step_trainable), ("frozen", step_frozen), ("pause", step_pause)]}
    # Same outputs where it matters: pause rows from the pause table, the rest from the base.
    with torch.no_grad():
        assert torch.equal(pause(tokens)[:, :100], frozen(tokens[:, :100]))

    print(f"vocab {args.vocab}, dim {args.dim}, {args.tokens} tokens, {args.num_pause} pause tokens/seq, "
          f"{args.dtype}, {torch.get_num_threads()} threads, median of {args.repeat}")
    for name, seconds in results.items():
        print(f"  {name:<10} {seconds * 1e3:8.2f} ms")
    print(f"  ratio pause / frozen lookup     = {results['pause'] / results['frozen']:.3f}")
    print(f"  ratio pause / trainable table   = {results['pause'] / results['trainable']:.3f}")


if __name__ == "__main__":
    main()
