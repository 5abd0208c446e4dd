"""Run one of torchtune's distributed recipe files on CPU processes.

    torchrun --nproc_per_node 2 benchmarks/gloo_recipe.py <recipe.py> --config <config.yaml> [key=value ...]

torchtune's distributed recipes assume GPUs in three places: they call
``init_process_group("cuda:nccl,cpu:gloo")``, which a CPU-only torch build refuses
(no NCCL), they log ``training.get_memory_stats`` after loading the model and call
``training.cleanup_before_training`` (``empty_cache``), which fail on a CPU. Here
the first becomes gloo, the second zeros, the third a garbage collection;
everything else in the recipe runs as written. recipe_throughput.py --nproc uses
this for its CPU baseline (on GPUs it runs torchtune's recipe with `tune run`).
"""

import gc
import runpy
import sys

import torch.distributed as dist
from torchtune import training

_init = dist.init_process_group
_memory_stats = training.get_memory_stats


def _gloo(backend=None, *args, **kwargs):
    return _init("gloo", *args, **kwargs)


def _memory_stats_or_zeros(device, *args, **kwargs):
    if device.type == "cpu":
        return {"peak_memory_active": 0.0, "peak_memory_alloc": 0.0, "peak_memory_reserved": 0.0}
    return _memory_stats(device, *args, **kwargs)


def _collect_garbage():
    gc.collect()


if __name__ == "__main__":
    # The recipe's `from torch.distributed import init_process_group` runs after this, and it
    # calls the training.* functions through the module: all see the replacements.
    dist.init_process_group = _gloo
    training.get_memory_stats = _memory_stats_or_zeros
    training.cleanup_before_training = _collect_garbage
    recipe = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(recipe, run_name="__main__")
