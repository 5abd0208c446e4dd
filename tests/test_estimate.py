"""blah_estimate: what it counts is what lives (NF4 at 4 bits, views free, the freed subtracted),
its errors name the key, and `tune run blah_estimate` prints and writes the verdicts."""

import json
import os
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from torchtune_blah.config_schema import ConfigError
from torchtune_blah.estimate import (GiB, LiveBytes, bnb_8bit_state_bytes, fake_tensors, measure, storage_bytes)
from torchtune_blah.recipes.blah_estimate import BlahEstimateRecipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nf4_weights_count_half_a_byte_per_number_plus_their_scalers():
    from torchao.dtypes.nf4tensor import to_nf4

    with fake_tensors():
        weight = to_nf4(torch.empty(4096, 4096, dtype=torch.bfloat16))
        nbytes = storage_bytes([weight])
    assert 0.5 <= nbytes / weight.numel() < 0.53  # 4 bits + one 8-bit scaler per 64 numbers (+ a few fp32)


def test_an_8b_qlora_layer_holds_what_nf4_and_lora_take():
    """Llama 3 8B: 218M base numbers at ~0.5 bytes and 5.2M LoRA numbers (r=64) in bf16 per layer."""
    cfg = OmegaConf.load(os.path.join(REPO, "configs", "llama3_8b_blah.yaml"))
    recipe = BlahEstimateRecipe(OmegaConf.merge(cfg, {"layers": 1, "tokenizer": {"max_seq_len": 64}}))
    with fake_tensors():
        recipe._build()
        layer = storage_bytes(list(recipe._model.layers[0].parameters()))
    assert 0.11 * GiB < layer < 0.13 * GiB


def test_live_bytes_counts_new_storages_not_views_and_subtracts_the_freed():
    with fake_tensors():
        x = torch.empty(1024, 1024)  # made before: not counted

        def work():
            y = x * 2  # 4 MiB
            z = y.t()  # a view: nothing new
            del z
            w = torch.empty(512, 1024)  # 2 MiB while y lives: peak 6 MiB
            del w, y
        with LiveBytes() as live:
            work()
        assert live.peak == 6 * 2 ** 20 and live.current == 0
        assert measure(lambda: x + 1) == 4 * 2 ** 20


def test_bitsandbytes_8bit_state_is_two_bytes_per_number_plus_block_statistics():
    big, small = torch.empty(4096, 64), torch.empty(10, 10)
    assert bnb_8bit_state_bytes([big]) == 2 * 4096 * 64 + 2 * 4 * (4096 * 64 // 256)
    assert bnb_8bit_state_bytes([small]) == 8 * 100  # below 4,096 numbers: 32-bit state


def _cfg(**overrides):
    cfg = OmegaConf.load(os.path.join(REPO, "configs", "llama3_8b_blah.yaml"))
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


@pytest.mark.parametrize("overrides,key", [
    ({"model": {"_component_": "torchtune.models.llama3.no_such_builder"}}, "model._component_"),
    ({"tokenizer": {"max_seq_len": None}}, "tokenizer.max_seq_len"),
    ({"tokenizer": {"max_seq_len": "long"}}, "tokenizer.max_seq_len"),
    ({"cards": ["twenty-four"]}, "cards"),
    ({"cards": 24}, "cards"),
    ({"gpus": 0}, "gpus"),
    ({"gpu": "tpu"}, "gpu"),
    ({"cuda_allowance_gib": -1}, "cuda_allowance_gib"),
    ({"phases": ["embed", "finetune"]}, "phases"),
])
def test_bad_input_names_the_key_before_anything_is_built(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        BlahEstimateRecipe(_cfg(**overrides))


def test_a_longer_sequence_needs_more_activation_memory_and_flops():
    every_position = {"logits_only_where_loss": False}  # the output projection scales with the length too
    short, = BlahEstimateRecipe(_cfg(layers=1, phases=["lora"], validation=None,
                                     tokenizer={"max_seq_len": 128}, **every_position)).run()[:1]
    long, = BlahEstimateRecipe(_cfg(layers=1, phases=["lora"], validation=None,
                                    tokenizer={"max_seq_len": 512}, **every_position)).run()[:1]
    # (Both also hold a transient bf16 copy of the NF4 output projection: 1 GB whatever the length.)
    assert long.activations > short.activations + 100 * 2 ** 20 and long.flops > 3.5 * short.flops
    assert long.parameters == short.parameters and long.optimizer_state == short.optimizer_state
    # blah_qlora's default: logits for the reply's positions only, less work and memory at the same length
    only, = BlahEstimateRecipe(_cfg(layers=1, phases=["lora"], validation=None,
                                    tokenizer={"max_seq_len": 512})).run()[:1]
    assert only.flops < 0.8 * long.flops and only.activations <= long.activations  # (the peak is elsewhere here)


@pytest.mark.slow
def test_tune_run_blah_estimate_prints_and_writes_the_verdicts(tmp_path):
    out = tmp_path / "est"
    proc = subprocess.run(["tune", "run", "blah_estimate", "--config", "llama3_2_1b_blah", "layers=2",
                           "tokenizer.max_seq_len=256", "cards=[8,24]", f"estimate_dir={out}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| embed:" in proc.stdout and "| lora:" in proc.stdout and "8 GB" in proc.stdout
    data = json.loads((out / "estimate.json").read_text())
    names = [e["name"].split(":")[0] for e in data["estimates"]]
    assert names == ["embed", "lora", "validation answering", "blah_eval answering"]
    for e in data["estimates"]:
        assert set(e["fits"]) == {"8GB", "24GB"} and e["peak_gib"] > 0
    assert (out / "estimate.md").read_text().startswith("blah_estimate:")
    bad = subprocess.run(["tune", "run", "blah_estimate", "--config", "llama3_2_1b_blah", "cards=[big]"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "cards" in bad.stderr


def test_fake_tensors_count_what_real_tensors_hold():
    """The same steps on real CPU tensors (SmolLM2-135M's shapes, 2 layers): every category and the
    FLOPs agree, so building and running without data changes nothing that is counted."""
    cfg = OmegaConf.load(os.path.join(REPO, "configs", "smollm2_135m_blah.yaml"))
    cfg = OmegaConf.merge(cfg, {"layers": 2, "tokenizer": {"max_seq_len": 192}, "eval_batch_size": 2,
                                "validation": {"batch_size": 2, "max_new_tokens": 4, "every_n_steps": 1}})
    torch.manual_seed(0)
    real = BlahEstimateRecipe(cfg).run(fake=False)
    fake = BlahEstimateRecipe(cfg).run()
    assert [e.name for e in real] == [e.name for e in fake] and len(real) == 4
    for r, f in zip(real, fake):
        assert (r.parameters, r.gradients, r.optimizer_state, r.flops) == (f.parameters, f.gradients,
                                                                           f.optimizer_state, f.flops), r.name
        assert r.step_temporaries == f.step_temporaries, r.name
        # (A boolean mask's count has no value on fake tensors: measured 160 bytes apart, of 56 MB.)
        assert abs(r.activations - f.activations) <= 1024, (r.name, r.activations, f.activations)
