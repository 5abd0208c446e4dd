"""blah_estimate checked against torchtune's published memory: its three Llama 3.1 8B single-device
configs, estimated with the settings of torchtune's README table ("Memory and training speed":
batch size 2, no gradient accumulation, a dataset packed to 2,048 tokens, compile on; one RTX
4090), beside the published peaks (18.9 / 16.2 / 7.4 GiB).

    python benchmarks/estimate_anchor.py                 # the whole model: about 5 minutes on 2 cores
    python benchmarks/estimate_anchor.py --layers 2      # a quick look

Each torchtune config is read from the installed torchtune (`recipes/configs/llama3_1/`) and run
through blah_estimate's recipe as one phase (no pause tokens): its model builder, its optimizer,
activation checkpointing and chunked cross-entropy as configured. The full finetune trains every
parameter with the optimizer step fused into backward (`optimizer_in_bwd: True`: each gradient is
applied and freed as soon as it is complete, so at most about one parameter's gradient lives) and
bitsandbytes' PagedAdamW8bit, whose state lives in CUDA unified memory outside torch's allocator:
torch's peak, which torchtune reports, does not include it (it is printed apart). Packed sequences
are counted as 2,048 supervised tokens each (the packed document mask changes no memory here).

The last line is machine-readable; `flops_per_token_qlora` is what blah_estimate's assumed MFU uses
(`ANCHOR_FLOPS_PER_TOKEN` in torchtune_blah/estimate.py).
"""

import argparse
import os

import torch
from omegaconf import OmegaConf

from torchtune_blah.estimate import (Estimate, GiB, bnb_8bit_state_bytes, compiled_loss_memory, count_flops,
                                     fake_tensors, measure, tensors_without_device_on_meta)
from torchtune_blah.recipes.blah_estimate import BlahEstimateRecipe

PUBLISHED = {"8B_full_single_device": (18.9, 1650), "8B_lora_single_device": (16.2, 3083),
             "8B_qlora_single_device": (7.4, 2413)}


def torchtune_config(name: str) -> OmegaConf:
    from importlib.util import find_spec

    # torchtune's recipes folder refuses to be imported; find it without importing it.
    recipes_dir = list(find_spec("recipes").submodule_search_locations)[0]
    path = os.path.join(recipes_dir, "configs", "llama3_1", f"{name}.yaml")
    return OmegaConf.load(path)


def as_estimate_config(name: str, layers) -> OmegaConf:
    tt = torchtune_config(name)
    cfg = {
        "model": OmegaConf.to_container(tt.model), "tokenizer": {"max_seq_len": 2048},
        "dtype": "bf16", "enable_activation_checkpointing": bool(tt.enable_activation_checkpointing),
        "loss": OmegaConf.to_container(tt.loss), "phases": ["lora"], "pause_tokens": {"num": 0},
        "lora": {"batch_size": 2, "gradient_accumulation_steps": 1,
                 "optimizer": OmegaConf.to_container(tt.optimizer)},
        "reply_tokens": 2048, "cards": [24], "layers": layers,
        "compile": True,  # as published; what it changes in memory: estimate.compiled_loss_memory
    }
    return OmegaConf.create(cfg)


class FullFinetune(BlahEstimateRecipe):
    """Every parameter trains, each gradient applied and freed in backward (optimizer_in_bwd)."""

    def _set_trainable(self, phase, train_pause):
        params = list(self._model.parameters())
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        return params

    def _phase(self, phase):
        self._model.train()
        params = self._set_trainable(phase, False)
        # optimizer_in_bwd: the post-accumulate-grad hook steps and frees each gradient.
        hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
        batch = self._batch(2)
        e = Estimate(name="full finetune: batch 2 x 2048, optimizer in backward")
        with tensors_without_device_on_meta(), compiled_loss_memory(self._loss_fn, self._compiled):
            e.activations = measure(lambda: self._micro_batch(batch, False))  # includes the transient gradients
            e.flops = count_flops(lambda: self._micro_batch(batch, False))
        for h in hooks:
            h.remove()
        e.tokens = 2 * self._opts["max_seq_len"]
        e.parameters = self._parameters
        e.notes.append(f"PagedAdamW8bit state {bnb_8bit_state_bytes(params) / GiB:.2f} GiB in unified memory, "
                       "outside torch's allocator (not in the peak)")
        return e


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="build only this many decoder layers")
    args = parser.parse_args()
    rows, flops_per_token = [], {}
    for name, (published, tps) in PUBLISHED.items():
        cfg = as_estimate_config(name, args.layers)
        recipe = (FullFinetune if "full" in name else BlahEstimateRecipe)(cfg)
        with fake_tensors():
            recipe._build()
            estimate = recipe._phase("lora")
        peak = estimate.peak / GiB
        flops_per_token[name] = estimate.flops / estimate.tokens
        rows.append((name, estimate, peak, published, tps))
        print(f"{name}: {peak:.2f} GiB estimated (params {estimate.parameters / GiB:.2f}, grads "
              f"{estimate.gradients / GiB:.2f}, optim {estimate.optimizer_state / GiB:.2f}, activations "
              f"{estimate.activations / GiB:.2f}, step {estimate.step_temporaries / GiB:.2f}) vs {published} published; "
              f"{flops_per_token[name] / 1e9:.2f} GFLOP/token; {'; '.join(estimate.notes)}", flush=True)
    print()
    print("| torchtune config (Llama 3.1 8B, batch 2, packed 2,048) | published peak GiB | estimated GiB | "
          "estimate / published | params | grads | optim | activations | GFLOP/token | published tokens/s | "
          "implied MFU on a 4090 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, e, peak, published, tps in rows:
        mfu = tps * flops_per_token[name] / 165.2e12
        print(f"| {name} | {published} | {peak:.2f} | {peak / published:.2f} | {e.parameters / GiB:.2f} | "
              f"{e.gradients / GiB:.2f} | {e.optimizer_state / GiB:.2f} | {e.activations / GiB:.2f} | "
              f"{flops_per_token[name] / 1e9:.2f} | {tps} | {mfu:.1%} |")
    print()
    print(" ".join(f"{name.split('_')[1]}_estimate_gib={peak:.2f} {name.split('_')[1]}_published_gib={published}"
                   for name, _, peak, published, _ in rows)
          + f" flops_per_token_qlora={flops_per_token['8B_qlora_single_device']:.4g}"
          + f" layers={args.layers or 32}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
