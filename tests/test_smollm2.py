"""SmolLM2-135M-Instruct, real pretrained weights: torchtune matches transformers, and the
method's machinery (abstention probe, stop rule, both training phases) works on it."""

import json
import os

import pytest
import torch
from conftest import read_disk_log
from smollm2_fixtures import prepared_smollm2_dir

from torchtune_blah.chat_format import chat_format
from torchtune_blah.data.chat import answer_prompt
from torchtune_blah.data.squad import load_squad_records
from torchtune_blah.eval.run import _abstention_prob_forced, abstention_probe, answer_records
from torchtune_blah.generation import greedy_generate, stop_token_ids
from torchtune_blah.pause import NO_PAUSE

pytestmark = pytest.mark.slow  # real SmolLM2-135M weights: the full suite only (python -m pytest -q)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smollm2_dir():
    return prepared_smollm2_dir()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from torchtune_blah.models.smollm2 import smollm2_tokenizer

    return smollm2_tokenizer(os.path.join(smollm2_dir, "tokenizer.json"))


@pytest.fixture(scope="module")
def model(smollm2_dir, tmp_path_factory):
    from torchtune.training import FullModelHFCheckpointer

    from torchtune_blah.models.smollm2 import smollm2_135m

    checkpointer = FullModelHFCheckpointer(checkpoint_dir=smollm2_dir, checkpoint_files=["model.safetensors"],
                                           model_type="LLAMA3_2", output_dir=str(tmp_path_factory.mktemp("ck")))
    m = smollm2_135m()
    m.load_state_dict(checkpointer.load_checkpoint()["model"], strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def dev_records():
    records = load_squad_records("bundled_sample")
    short = [r for r in records if len(r.context.split()) <= 80]
    return [r for r in short if r.has_answer][:3] + [r for r in short if not r.has_answer][:3]


def test_torchtune_matches_transformers_on_real_prompts(smollm2_dir, model, tokenizer, dev_records):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = [answer_prompt(tokenizer, r, []) for r in dev_records[:2]]
    prompts.append(torch.randint(0, 49152, (200,), generator=torch.Generator().manual_seed(0)).tolist())
    with torch.no_grad():
        for prompt in prompts:
            x = torch.tensor([prompt])
            ours, theirs = model(x), hf(x).logits
            assert (ours - theirs).abs().max().item() <= 5e-4
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # Greedy decoding: our batched KV-cache loop and transformers' generate give the same tokens.
    gens = greedy_generate(model, prompts[:2], pad_id=tokenizer.pad_id, stop_ids=set(), max_new_tokens=12)
    for prompt, gen in zip(prompts[:2], gens):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=tokenizer.pad_id)
        assert gen.tokens == out[0, len(prompt):].tolist()


def test_abstention_probe_and_stop_rule_on_the_real_model(model, tokenizer, dev_records):
    fmt = chat_format(tokenizer)
    probe = abstention_probe(tokenizer)
    assert fmt.decode(list(probe.scaffold)) + fmt.decode([probe.token]) in ('\n{\n  "answer": "?', '\n{\n  "answer": "?"')
    stops = stop_token_ids(tokenizer)
    rows = answer_records(model, tokenizer, dev_records, NO_PAUSE, prompt_style="single_turn", stop_ids=stops,
                          probe=probe, max_new_tokens=48)
    prompts = [answer_prompt(tokenizer, r, []) for r in dev_records]
    gens = greedy_generate(model, prompts, pad_id=tokenizer.pad_id, stop_ids=stops, max_new_tokens=48,
                           probe=(probe.step, probe.token))
    wrote_scaffold = 0
    for prompt, gen, row in zip(prompts, gens, rows):
        # The stop rule: a reply ends at its first stop token ("}" or end of turn), not before, not after.
        assert all(t not in stops for t in gen.tokens[:-1])
        if gen.stopped:
            assert gen.tokens[-1] in stops
            if gen.tokens[-1] not in fmt.end_ids:
                assert row["raw_output"].endswith("}")
        # The probe reads P("?") where the answer value starts: the same number as a separate forward
        # pass over prompt + scaffold.
        assert 0.0 <= row["na_prob"] <= 1.0
        if tuple(gen.tokens[: probe.step]) == probe.scaffold:
            wrote_scaffold += 1
            assert abs(gen.probe_prob - _abstention_prob_forced(model, prompt, probe, NO_PAUSE)) < 1e-4
    assert wrote_scaffold >= len(dev_records) // 2  # the instruct model mostly follows the JSON format


def test_a_few_training_steps_lower_the_loss_in_each_phase(smollm2_dir, tmp_path):
    """blah_qlora on the real model, 6 real training questions seen twice: each phase's second
    pass has a lower mean loss than its first."""
    from omegaconf import OmegaConf

    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    records = load_squad_records("bundled_train")
    chosen = [r for r in records if r.has_answer][:4] + [r for r in records if not r.has_answer][:2]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "context": r.context, "question": r.question,
                                        "answers": list(r.answers)}) + "\n" for r in chosen))
    out = tmp_path / "run"
    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(REPO, "configs", "smollm2_135m_blah.yaml")), OmegaConf.from_dotlist([
        f"output_dir={out}", f"tokenizer.path={smollm2_dir}/tokenizer.json", f"checkpointer.checkpoint_dir={smollm2_dir}",
        "dataset.source=json", f"dataset.data_files={data}", "save_adapter_weights_only=true",
        "embed.epochs=2", "embed.max_steps=null", "embed.batch_size=2", "embed.save_every_n_steps=null",
        "lora.epochs=2", "lora.max_steps=null", "lora.batch_size=2", "lora.save_every_n_steps=null"]))
    recipe = BlahQLoRARecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    losses = read_disk_log(str(out / "logs"))
    for phase in ("embed", "lora"):
        values = losses[f"{phase}/loss"]
        assert len(values) == 6
        assert sum(values[3:]) < sum(values[:3]), (phase, values)
    assert (out / "lora" / "adapter_model.safetensors").is_file()


def test_prepare_keeps_a_prepared_folder_and_refuses_a_foreign_one(smollm2_dir, tmp_path, capsys):
    from torchtune_blah.models.gguf_convert import DONE_MARKER, prepare_smollm2

    before = os.stat(os.path.join(smollm2_dir, "model.safetensors")).st_mtime_ns
    assert prepare_smollm2(smollm2_dir) == smollm2_dir
    assert "already prepared" in capsys.readouterr().out
    assert os.stat(os.path.join(smollm2_dir, "model.safetensors")).st_mtime_ns == before
    assert os.path.isfile(os.path.join(smollm2_dir, DONE_MARKER))
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        config = json.load(f)
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    with open(os.path.join(smollm2_dir, "tokenizer.json")) as f:
        pre = json.load(f)["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds something else"):
        prepare_smollm2(str(foreign))
    assert (foreign / "todo.txt").read_text() == "mine"


def test_nf4_is_refused_with_a_message_for_small_smollm2_sizes():
    from torchtune_blah.models.smollm2 import lora_smollm2_135m, lora_smollm2_360m

    for builder in (lora_smollm2_135m, lora_smollm2_360m):
        with pytest.raises(ValueError, match="quantize_base: false"):
            builder(quantize_base=True)
