"""What this machine can do, and what share of it a training step uses.

``matmul_peak()``: the bf16 matrix-product rate (FLOP/s) of ``torch.randn(n, n) @ ...`` at n =
1,024-4,096 on this process's threads, the best of a few repeats: the machine's practical peak for
the work a LoRA step is made of (torch's CPU kernels; on a GPU, its tensor cores).

``lora_step_flops(cfg, first, last)``: FLOPs of blah_qlora's own loss step + backward (the
recipe's ``_loss_step``, counted by ``torch.utils.flop_counter.FlopCounterMode``) over the lora
phase's batches ``first..last-1`` of ``cfg`` (the batches a benchmark's timed steps saw, shuffle
off), and their supervised tokens: FLOPs per supervised token x tokens/s = achieved FLOP/s.
"""

import time

import torch


def matmul_peak(sizes=(1024, 2048, 4096), dtype=torch.bfloat16, device="cpu", repeats=3) -> float:
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b  # warm-up
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def lora_step_flops(cfg: dict, first: int, last: int):
    """(FLOPs, supervised tokens) of the lora phase's batches first..last-1 under ``cfg`` (a dict)."""
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode
    from torchtune import utils

    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    cfg = OmegaConf.create(cfg)
    recipe = BlahQLoRARecipe(cfg)
    recipe.setup(cfg)
    recipe._set_trainable("lora", train_pause=False)
    batch_size = int(cfg.lora.batch_size)
    ignore = torch.full((batch_size, 1), recipe._loss_fn.ignore_index, device=recipe._device)
    flops = tokens = 0
    for i, batch in enumerate(recipe._dataloader(batch_size)):
        if i >= last:
            break
        if i < first:
            continue
        utils.batch_to_device(batch, recipe._device)
        tokens += int((batch["labels"] != recipe._loss_fn.ignore_index).sum())
        with FlopCounterMode(display=False) as counter:
            recipe._loss_step(batch, ignore).backward()
        flops += counter.get_total_flops()
        recipe._model.zero_grad(set_to_none=True)
    recipe.cleanup()
    return flops, tokens
