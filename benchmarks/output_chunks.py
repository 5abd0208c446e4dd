"""The chunked output projection: torchtune's strided chunks against contiguous ones
(torchtune_blah.model.set_num_output_chunks), forward and backward, on SmolLM2-135M's output shape.

    python benchmarks/output_chunks.py                      # bf16, CPU, batch 4 (seconds)
    python benchmarks/output_chunks.py --device cuda --dim 4096 --vocab 128256   # Llama 3 8B's shape

The weight is frozen, as in both phases; the hidden state needs its gradient (the layers below
train). Random numbers: only the shapes matter. Ends with one line: contiguous_over_strided=<time ratio>
at the longest length.
"""

import argparse
import time

import torch
import torch.nn.functional as F


def seconds(fn, device, repeats=3):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunks", type=int, default=8)  # CEWithChunkedOutputLoss's default
    p.add_argument("--lengths", type=int, nargs="+", default=[44, 366])  # the embed cut's rest; a whole example
    args = p.parse_args()
    device, dtype = torch.device(args.device), {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    weight = torch.randn(args.vocab, args.dim, device=device, dtype=dtype) * 0.02
    print(f"output projection {args.dim} -> {args.vocab}, batch {args.batch_size}, {args.chunks} chunks, "
          f"{args.device}/{args.dtype}; seconds per forward+backward")
    ratio = None
    for length in args.lengths:
        hidden = torch.randn(args.batch_size, length, args.dim, device=device, dtype=dtype, requires_grad=True)

        def step(contiguous):
            chunks = hidden.chunk(args.chunks, dim=1)
            logits = [F.linear(c.contiguous() if contiguous else c, weight) for c in chunks]
            sum(x.float().sum() for x in logits).backward()
            hidden.grad = None

        strided, contiguous = seconds(lambda: step(False), device), seconds(lambda: step(True), device)
        ratio = contiguous / strided
        print(f"  length {length:4d}: strided (torchtune) {strided:.3f} s   contiguous (ours) {contiguous:.3f} s   "
              f"ratio {ratio:.3f}")
    print(f"contiguous_over_strided={ratio:.3f}")


if __name__ == "__main__":
    main()
