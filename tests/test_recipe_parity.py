"""With zero pause tokens and phases=[lora], blah_qlora is torchtune's own LoRA recipe.

Both run through `tune run` on the same tiny NF4 model, tokenizer, data (our
dataset builder in both configs), seed and hyper-parameters, with LoRA dropout
on; the per-step losses must agree to a relative 1e-5.
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


def _run(args, cwd):
    result = subprocess.run([TUNE, "run", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.parametrize("accum", [1, 2])
def test_losses_equal_torchtunes_lora_recipe(tmp_path, tiny_base, accum):
    theirs_cfg = {**_common(tmp_path / "torchtune", tiny_base), "batch_size": 2, "epochs": 1,
                  "max_steps_per_epoch": STEPS, "gradient_accumulation_steps": accum, "clip_grad_norm": 1.0,
                  "optimizer": OPTIMIZER, "lr_scheduler": SCHEDULER}
    ours_cfg = {**_common(tmp_path / "ours", tiny_base), "phases": ["lora"],
                "pause_tokens": {"num": 0},
                "lora": {"epochs": 1, "max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": accum,
                         "clip_grad_norm": 1.0, "optimizer": OPTIMIZER, "lr_scheduler": SCHEDULER}}
    for name, cfg in (("theirs.yaml", theirs_cfg), ("ours.yaml", ours_cfg)):
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
    _run(["lora_finetune_single_device", "--config", str(tmp_path / "theirs.yaml")], tmp_path)
    _run(["blah_qlora", "--config", str(tmp_path / "ours.yaml")], tmp_path)

    theirs = read_disk_log(str(tmp_path / "torchtune" / "logs"))["loss"]
    ours = read_disk_log(str(tmp_path / "ours" / "logs"))["lora/loss"]
    assert len(theirs) == len(ours) == STEPS
    for step, (a, b) in enumerate(zip(theirs, ours), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: torchtune {a} vs blah_qlora {b}"
    assert theirs[-1] < theirs[0]  # the comparison is over a run that learns

