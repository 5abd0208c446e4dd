# torchtune-blah: the two-phase pause-token recipe, one device.
#
#   tune run blah_qlora --config llama3_8b_blah
#
# Phase "embed" trains only the pause-token input embeddings (5 x 4096 = 20,480
# parameters on Llama 3 8B) with the NF4 base and the LoRA adapters frozen and
# switched off: the model learns to think before it learns to speak. Phase
# "lora" loads them, freezes them (as the seed did) and trains QLoRA adapters.
# With pause_tokens.num=0 and phases=[lora] this is plain answer-only QLoRA SFT.
#
# The loop lives in torchtune_blah.two_phase (shared with blah_qlora_distributed,
# the FSDP2 version); it follows torchtune's lora_finetune_single_device step for
# step, so with zero pause tokens both recipes log the same losses
# (tests/test_recipe_parity.py).
#
# Outputs (the evaluation recipe reads exactly this layout):
#   output_dir/blah_config.yaml                     the resolved config of the run
#   output_dir/embed/pause_embeddings.safetensors   after embed (+ phase_complete.json)
#   output_dir/lora/adapter_model.safetensors       after lora, PEFT layout, with adapter_config.json
#   output_dir/lora/pause_embeddings.safetensors    the pause rows the adapter was trained with
#   output_dir/lora/model-*.safetensors             merged model, unless save_adapter_weights_only
#   output_dir/<phase>/checkpoint/training_state.pt while a phase runs: what resume_from_checkpoint reads

import sys

from omegaconf import DictConfig
from torchtune import config

from torchtune_blah.two_phase import TrainingStopped, TwoPhaseRecipe, run_recipe

__all__ = ["BlahQLoRARecipeSingleDevice", "TrainingStopped"]


class BlahQLoRARecipeSingleDevice(TwoPhaseRecipe):
    """Two phases, one model: pause embeddings first, then QLoRA adapters. Single device."""


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="BlahQLoRARecipeSingleDevice", cfg=cfg)
    run_recipe(BlahQLoRARecipeSingleDevice(cfg=cfg), cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
