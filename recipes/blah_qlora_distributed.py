# torchtune-blah: the two-phase pause-token recipe on several GPUs, with FSDP2.
#
#   tune run --nproc_per_node 2 blah_qlora_distributed --config llama3_8b_blah_2gpu
#
# The same loop, keys, outputs and resume as blah_qlora: this file starts the process group and
# hands blah_qlora's recipe an FSDP2 object (torchtune_blah.parallel.FSDP2): the recipe sets the
# model up on the meta device as on one GPU, the object shards it (one unit per transformer layer,
# per custom_sharded_layers entry, and the root), loads each rank's shards, and does the
# collectives; each rank reads every world_size-th sample, and rank 0 writes every file. To
# change the loop, `tune cp blah_qlora`: your copy runs under
# `tune run --nproc_per_node N my_recipe.py` once its recipe_main does what this one does.

import sys

from omegaconf import DictConfig
from torchtune import config, training

from torchtune_blah.parallel import FSDP2, init_process_group
from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe, run_recipe


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    if not training.is_distributed():
        raise RuntimeError("blah_qlora_distributed runs under a distributed launcher: "
                           "tune run --nproc_per_node N blah_qlora_distributed --config ... "
                           "(one GPU: tune run blah_qlora)")
    init_process_group(cfg.device)
    if cfg.get("fsdp_cpu_offload", False):
        training.set_torch_num_threads()  # the optimizer steps on the CPU: use its cores (torchtune's way)
    config.log_config(recipe_name="BlahQLoRARecipe (FSDP2)", cfg=cfg)
    run_recipe(BlahQLoRARecipe(cfg=cfg, parallel=FSDP2(cfg)), cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
