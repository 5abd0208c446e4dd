"""blah_qlora on the tiny model: through `tune run` and in-process."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from torchao.dtypes.nf4tensor import NF4Tensor

from conftest import demo_cfg, fast_overrides, read_disk_log
from torchtune_blah.run_dir import TRAINING_STATE_FILE
from torchtune_blah.pause import read_pause_embeddings
from torchtune_blah.recipe_config import ConfigError
from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe, TrainingStopped

TUNE = shutil.which("tune")


def _recipe(overrides):
    cfg = demo_cfg(overrides)
    recipe = BlahQLoRARecipe(cfg)
    return recipe, cfg


def _run_in_process(overrides):
    recipe, cfg = _recipe(overrides)
    recipe.setup(cfg)
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


@pytest.mark.slow
def test_tune_run_both_phases_and_the_artifact_layout(tmp_path, tiny_base):
    out = tmp_path / "run"
    result = subprocess.run([TUNE, "run", "blah_qlora", "--config", "demo_cpu_blah",
                             *fast_overrides(out, tiny_base)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "embed: 1,280 trainable parameters (5 pause rows x 256)" in result.stdout + result.stderr
    for path in ["blah_config.yaml", "embed/pause_embeddings.safetensors", "embed/phase_complete.json",
                 "lora/adapter_model.safetensors", "lora/adapter_config.json", "lora/pause_embeddings.safetensors",
                 "lora/phase_complete.json", "lora/model-00001-of-00001.safetensors", "lora/config.json"]:
        assert (out / path).is_file(), path
    assert not (out / "embed" / "checkpoint").exists() and not (out / ".checkpointer").exists()

    # lora starts from, and keeps (frozen by default), the pause rows embed wrote
    embed_rows, meta = read_pause_embeddings(str(out / "embed"))
    lora_rows, _ = read_pause_embeddings(str(out / "lora"))
    assert torch.equal(embed_rows, lora_rows)
    assert meta["names"] == [f"<blah_{i}>" for i in range(5)]

    # the adapter reloads in the PEFT layout, with LoRA on every linear layer
    adapter = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert any(k.endswith("q_proj.lora_A.weight") for k in adapter) and any("lm_head" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved off zero
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and "q_proj" in config["target_modules"]

    metrics = read_disk_log(str(out / "logs"))
    assert len(metrics["embed/loss"]) == 6 and len(metrics["lora/loss"]) == 6

    # a rerun into the same output_dir refuses to overwrite it
    again = subprocess.run([TUNE, "run", "blah_qlora", "--config", "demo_cpu_blah", *fast_overrides(out, tiny_base)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "already holds a run" in again.stderr

    # phases=[lora] alone from the saved pause embeddings: loads exactly those rows
    recipe, cfg = _recipe(fast_overrides(tmp_path / "lora_only", tiny_base, phases="[lora]",
                                         pause_embeddings_path=str(out / "embed")))
    recipe.setup(cfg)
    assert torch.equal(recipe._pause_module.pause_weight.detach(), embed_rows)
    recipe.cleanup()


def _bits(tensor):
    """A tensor's exact contents; an NF4 weight is its packed codes, block scalers and means."""
    if isinstance(tensor, NF4Tensor):
        return [t.detach().clone() for t in (tensor.quantized_data, tensor.quantized_scalers,
                                             tensor.quantization_factor, tensor.scaler_mean, tensor.nf4)]
    return [tensor.detach().clone()]


@pytest.mark.slow
def test_embed_changes_only_the_pause_rows(tmp_path, tiny_base):
    recipe, cfg = _recipe(fast_overrides(tmp_path / "run", tiny_base, phases="[embed]"))
    recipe.setup(cfg)
    model = recipe._model
    before = {n: _bits(p) for n, p in model.named_parameters()}
    assert sum(isinstance(p, NF4Tensor) for p in model.parameters()) == 14  # 2 layers x 7 projections
    before_nf4 = {n: b.detach().clone() for n, b in model.state_dict().items()}
    recipe.train()
    recipe.cleanup()
    after = {n: _bits(p) for n, p in model.named_parameters()}
    changed = [n for n in before if not all(torch.equal(a, b) for a, b in zip(before[n], after[n]))]
    assert changed == ["tok_embeddings.pause_weight"]
    after = dict(model.named_parameters())
    after_sd = model.state_dict()  # dequantized NF4 base weights, LoRA weights, norms, base table
    assert all(torch.equal(before_nf4[k], after_sd[k]) for k in before_nf4)
    rows, _ = read_pause_embeddings(str(tmp_path / "run" / "embed"))
    assert torch.equal(rows, after["tok_embeddings.pause_weight"].detach())


@pytest.mark.slow
def test_embed_loss_falls_on_a_small_repeated_set(tmp_path, tiny_base, squad_official):
    records = [{"id": qa["id"], "context": p["context"], "question": qa["question"],
                "answers": [a["text"] for a in qa["answers"]]}
               for p in squad_official["data"][0]["paragraphs"][:2] for qa in p["qas"][:2]]
    data = tmp_path / "four.json"
    data.write_text(json.dumps(records))
    overrides = fast_overrides(tmp_path / "run", tiny_base, phases="[embed]", **{
        "dataset._component_": "torchtune_blah.data.squad_chat_dataset", "dataset.source": "json",
        "dataset.data_files": str(data), "tokenizer.max_seq_len": 2048, "embed.batch_size": 4,
        "embed.epochs": 40, "embed.max_steps": 40, "embed.optimizer.lr": 0.05, "shuffle": False,
        "validation": "null"})
    _run_in_process(overrides)
    losses = read_disk_log(str(tmp_path / "run" / "logs"))["embed/loss"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 0.2, losses


@pytest.mark.slow
def test_zero_pause_tokens_is_plain_sft(tmp_path, tiny_base):
    recipe = _run_in_process(fast_overrides(tmp_path / "run", tiny_base, phases="[lora]", **{"pause_tokens.num": 0}))
    assert recipe._pause_module is None
    out = tmp_path / "run" / "lora"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "pause_embeddings.safetensors").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"phases": "[embed,think]"}, "phases: unknown phase 'think'"),
        ({"phases": "[lora,embed]"}, "embed before lora"),
        ({"phases": "[embed]", "pause_tokens.num": 0}, "phases includes 'embed' but pause_tokens.num is 0"),
        ({"phases": "[lora]"}, "needs pause_embeddings_path"),
        ({"phases": "[lora]", "pause_embeddings_path": "/nonexistent/embed"}, "pause_embeddings_path: .* does not exist"),
        ({"embed.learning_rate": 0.1}, r"embed.learning_rate is not a blah_qlora key"),
        ({"datset.source": "json"}, r"datset is not a blah_qlora key; did you mean dataset\?"),
        ({"+dataset.source": "json"}, r"\+dataset is not a blah_qlora key; did you mean dataset\?.*not \+dataset.x=1"),
        ({"dataset.max_context_wrds": 10}, r"dataset.max_context_wrds is not a key of .*did you mean dataset.max_context_words\?"),
        ({"lora.epochs": "two"}, r"lora.epochs: Value 'two' of type 'str' could not be converted to Integer"),
        ({"validation.every_n_step": 3}, r"validation.every_n_step is not a blah_qlora key; did you mean validation.every_n_steps\?"),
        ({"lora.batch_size": 0}, r"lora.batch_size must be an integer >= 1"),
        ({"pause_tokens.vocab_size": 2048}, r"set pause_tokens.vocab_size=1056"),
        ({"resume_from_checkpoint": True}, "holds no phase of this run to resume"),
        ({"dataset.packed": True, "embed.backward_from_first_pause": True},
         "embed.backward_from_first_pause needs one process and unpacked data"),
    ],
)
def test_config_errors_fail_before_the_model_loads(tmp_path, tiny_base, extra, message):
    with pytest.raises(ConfigError, match=message):
        _recipe(fast_overrides(tmp_path / "run", tiny_base, **extra))


def test_the_embed_cut_setting_is_ignored_when_no_embed_phase_runs(tmp_path, tiny_base):
    # The shipped SmolLM2 config sets it: phases=[lora] with packed data must still run.
    recipe, _ = _recipe(fast_overrides(tmp_path / "run", tiny_base, phases="[lora]", **{
        "pause_tokens.num": 0, "dataset.packed": True, "embed.backward_from_first_pause": True}))
    assert recipe._phases == ["lora"]


def test_output_dir_inside_checkpoint_dir_is_refused(tmp_path, tiny_base):
    with pytest.raises(ConfigError, match="output_dir .* is inside checkpointer.checkpoint_dir"):
        _recipe(fast_overrides(os.path.join(tiny_base["checkpoint_dir"], "out"), tiny_base))


@pytest.mark.slow
def test_mismatched_pause_embeddings_path(tmp_path, tiny_base):
    _run_in_process(fast_overrides(tmp_path / "run", tiny_base, phases="[embed]"))
    for extra, message in [({"pause_tokens.num": 4}, "file has 5 tokens on 5 rows, config has 4 on 4"),
                           ({"pause_tokens.distinct": False}, "file has 5 tokens on 5 rows, config has 5 on 1"),
                           ({"pause_tokens.mode": "reserved"}, "file has 'append', config has 'reserved'")]:
        with pytest.raises(ConfigError, match=message):
            _recipe(fast_overrides(tmp_path / "lora", tiny_base, phases="[lora]",
                                   pause_embeddings_path=str(tmp_path / "run" / "embed"), **extra))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_base):
    recipe, cfg = _recipe(fast_overrides(tmp_path / "run", tiny_base, phases="[embed]"))
    recipe.setup(cfg)
    real_loss, calls = recipe._loss_fn, []

    def loss_that_breaks(logits, labels):
        calls.append(1)
        loss = real_loss(logits, labels)
        return loss * float("nan") if len(calls) == 5 else loss

    recipe._loss_fn = loss_that_breaks
    recipe._loss_fn.ignore_index = real_loss.ignore_index
    with pytest.raises(TrainingStopped, match="loss is nan at step 5"):
        recipe.train()
    recipe.cleanup()
    state = torch.load(tmp_path / "run" / "embed" / TRAINING_STATE_FILE, weights_only=False)
    assert state["step"] == 4 and torch.isfinite(state["trainable"]["tok_embeddings.pause_weight"]).all()
    assert not (tmp_path / "run" / "embed" / "phase_complete.json").exists()


@pytest.mark.slow
def test_in_training_validation_logs_exact_match(tmp_path, tiny_base):
    _run_in_process(fast_overrides(tmp_path / "run", tiny_base, phases="[lora]", **{
        "pause_tokens.num": 0, "validation.every_n_steps": 3, "validation.max_examples": 4,
        "validation.max_new_tokens": 8}))
    metrics = read_disk_log(str(tmp_path / "run" / "logs"))
    assert len(metrics["lora/val_exact_match"]) == 2  # steps 3 and 6
    assert all(0.0 <= v <= 100.0 for v in metrics["lora/val_official_f1"])
    with pytest.raises(ConfigError, match="validation needs a held-out split"):
        _recipe(fast_overrides(tmp_path / "other", tiny_base, **{"dataset.holdout_fraction": 0.0}))


@pytest.mark.slow
def test_activation_checkpointing_trains_and_saves_the_same_adapter(tmp_path, tiny_base):
    """Activation checkpointing wraps every layer (``_checkpoint_wrapped_module`` in parameter
    names): the lora phase must still train the adapter, save it, and match a run without it."""
    runs = {}
    for ac in (False, True):
        out = tmp_path / f"ac_{ac}"
        _run_in_process(fast_overrides(out, tiny_base, **{
            "enable_activation_checkpointing": ac, "model.lora_dropout": 0.0, "validation": "null",
            "embed.max_steps": 2, "lora.max_steps": 3}))
        runs[ac] = torch.load(out / "lora" / "adapter_model.pt", weights_only=True)
    assert runs[True].keys() == runs[False].keys() and len(runs[True]) > 0
    for name, value in runs[True].items():
        assert torch.allclose(value, runs[False][name], atol=1e-5), name
    assert any(v.abs().max() > 0 for k, v in runs[True].items() if "lora_b" in k)  # lora_b starts at 0: it trained


@pytest.mark.slow
def test_tune_cp_gives_the_loop_to_edit_and_tune_run_runs_the_copy(tmp_path, tiny_base):
    """torchtune's convention: the copied recipe holds the training loop. Edit the copy (log an
    extra metric every step) and run it: the run's log has the metric."""
    copy = tmp_path / "my_recipe.py"
    result = subprocess.run([TUNE, "cp", "blah_qlora", str(copy)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    source = copy.read_text()
    assert "def _train_epoch(" in source and "current_loss.backward()" in source and "optimizer.step()" in source
    anchor = 'metrics = {f"{phase}/loss": loss_to_log,'
    assert source.count(anchor) == 1
    copy.write_text(source.replace(anchor, anchor + ' f"{phase}/my_metric": 2.0 * loss_to_log,'))
    out = tmp_path / "run"
    # torchtune 0.6.1 runs a custom recipe as a module of the working directory: "my_recipe.py" from its folder
    result = subprocess.run([TUNE, "run", "my_recipe.py", "--config", "demo_cpu_blah",
                             *fast_overrides(out, tiny_base, phases="[lora]", **{"pause_tokens.num": 0})],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_disk_log(str(out / "logs"))
    assert len(metrics["lora/my_metric"]) == 6
    assert metrics["lora/my_metric"] == pytest.approx([2.0 * v for v in metrics["lora/loss"]])
