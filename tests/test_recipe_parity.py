"""With zero pause tokens and phases=[lora], blah_qlora is torchtune's own LoRA recipe.

Both run through `tune run` on the same tiny NF4 model, tokenizer, data (our
dataset builder in both configs), seed and hyper-parameters, with LoRA dropout
on; the per-step losses must agree to a relative 1e-5.

The two start alike: blah_qlora draws its fresh LoRA weights on the CPU from the seed
(the same on any device and any number of ranks), where torchtune's single-device recipe
draws them between the throwaway random init of the base weights. So torchtune's recipe
runs here unchanged but for its start (``FROM_BLAH_START``): the LoRA weights blah_qlora
draws, and the RNG stream (LoRA dropout) at the seed when training begins, as in ours.
"""

import shutil
import subprocess

import pytest
import yaml

from conftest import read_disk_log

pytestmark = pytest.mark.slow  # torchtune's recipe and ours, trained side by side: the full suite only (python -m pytest -q)

TUNE = shutil.which("tune")
STEPS = 8


def _common(out, tiny_base):
    return {
        "output_dir": str(out),
        "model": {"_component_": "torchtune_blah.tiny.tiny_qlora_llama3",
                  "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                  "apply_lora_to_mlp": True, "apply_lora_to_output": True,
                  "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.1},
        "tokenizer": {"_component_": "torchtune_blah.tiny.tiny_llama3_tokenizer",
                      "path": tiny_base["tokenizer"], "max_seq_len": 512},
        "checkpointer": {"_component_": "torchtune_blah.tiny.tiny_llama3_checkpointer",
                         "checkpoint_dir": tiny_base["checkpoint_dir"], "output_dir": str(out)},
        "resume_from_checkpoint": False,
        "save_adapter_weights_only": True,
        "dataset": {"_component_": "torchtune_blah.data.squad_sample_dataset", "pause_tokens": {"num": 0}},
        "seed": 0,
        "shuffle": True,
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "device": "cpu", "dtype": "fp32", "compile": False,
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": f"{out}/logs"},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
    }


OPTIMIZER = {"_component_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.01}
SCHEDULER = {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup", "num_warmup_steps": 2}


FROM_BLAH_START = '''
import importlib.util
import os
import sys

import torch
from torchtune import config, training

from torchtune_blah.model import fresh_lora_weights

# torchtune's recipe, as `tune cp lora_finetune_single_device` gives it (its folder is no package)
_spec = importlib.util.spec_from_file_location(
    "torchtune_lora", os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchtune_lora.py"))
_theirs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_theirs)
LoRAFinetuneRecipeSingleDevice = _theirs.LoRAFinetuneRecipeSingleDevice


class FromBlahStart(LoRAFinetuneRecipeSingleDevice):
    def _setup_model(self, **kwargs):
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            meta = config.instantiate(kwargs["cfg_model"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kwargs["lora_weights_state_dict"] = fresh_lora_weights(meta, self._dtype)
        return super()._setup_model(**kwargs)

    def setup(self, cfg):
        super().setup(cfg)
        torch.manual_seed(self.seed)


@config.parse
def recipe_main(cfg):
    recipe = FromBlahStart(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
'''


def _run_tune(args, cwd):
    result = subprocess.run([TUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def _run(args, cwd):
    _run_tune(["run", *args], cwd)


@pytest.mark.parametrize("accum", [1, 2])
def test_losses_equal_torchtunes_lora_recipe(tmp_path, tiny_base, accum):
    theirs_cfg = {**_common(tmp_path / "torchtune", tiny_base), "batch_size": 2, "epochs": 1,
                  "max_steps_per_epoch": STEPS, "gradient_accumulation_steps": accum, "clip_grad_norm": 1.0,
                  "optimizer": OPTIMIZER, "lr_scheduler": SCHEDULER}
    # logits_only_where_loss=false: every position unembedded, as torchtune does, so the arithmetic is
    # the same to the bit; with it on, the loss and gradients equal these to float summation order
    # (tests/test_output_positions.py), which AdamW magnifies in the elements whose gradient is ~0.
    ours_cfg = {**_common(tmp_path / "ours", tiny_base), "phases": ["lora"], "logits_only_where_loss": False,
                "pause_tokens": {"num": 0},
                "lora": {"epochs": 1, "max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": accum,
                         "clip_grad_norm": 1.0, "optimizer": OPTIMIZER, "lr_scheduler": SCHEDULER}}
    for name, cfg in (("theirs.yaml", theirs_cfg), ("ours.yaml", ours_cfg)):
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
    _run_tune(["cp", "lora_finetune_single_device", str(tmp_path / "torchtune_lora.py")], tmp_path)
    (tmp_path / "torchtune_from_blah_start.py").write_text(FROM_BLAH_START)
    _run(["torchtune_from_blah_start.py", "--config", str(tmp_path / "theirs.yaml")], tmp_path)
    _run(["blah_qlora", "--config", str(tmp_path / "ours.yaml")], tmp_path)

    theirs = read_disk_log(str(tmp_path / "torchtune" / "logs"))["loss"]
    ours = read_disk_log(str(tmp_path / "ours" / "logs"))["lora/loss"]
    assert len(theirs) == len(ours) == STEPS
    for step, (a, b) in enumerate(zip(theirs, ours), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: torchtune {a} vs blah_qlora {b}"
    assert theirs[-1] < theirs[0]  # the comparison is over a run that learns

