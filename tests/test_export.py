"""blah_export: a finished run as a Hugging Face model (transformers loads it, no custom code) and
as a PEFT adapter, checked against torchtune and blah_eval on the tiny run and on a real
SmolLM2-135M-Instruct run. (One file over 350 lines: both formats share the fixtures of one trained run.)"""

import json
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from smollm2_fixtures import prepared_smollm2_dir
from torchtune import config

from conftest import REPO
from torchtune_blah.data.chat import answer_prompt, tokenize_chat
from torchtune_blah.data.squad import ANSWER_PREFIX, load_squad_records, squad_messages
from torchtune_blah.export import ExportError, export_run, plan_export
from torchtune_blah.generation import stop_token_ids
from torchtune_blah.model import load_run_model
from torchtune_blah.run_dir import RunDir

pytestmark = pytest.mark.slow  # exports of trained tiny and SmolLM2 runs: the full suite only (python -m pytest -q)



def _export(run_dir, out, **kwargs):
    return export_run(plan_export(run_dir, str(out), **kwargs))


def _run_model(run_dir, stage, tmp_path, quantize_base=None):
    run_cfg = RunDir(run_dir).read_config()
    model, pause = load_run_model(run_cfg, run_dir, stage, torch.device("cpu"), torch.float32,
                                  staging_dir=str(tmp_path / f".stage_{stage}"), quantize_base=quantize_base)
    return model, pause, config.instantiate(run_cfg.tokenizer)


def _question(record):
    """The single-turn conversation up to the answer: what a user of the export sends."""
    messages = squad_messages(record, "single_turn")
    return [{"role": m.role, "content": m.content} for m in messages if m.role != "assistant"]


def _hf_prompt(hf_tokenizer, spec, record):
    text = hf_tokenizer.apply_chat_template(_question(record), add_generation_prompt=True, tokenize=False)
    return hf_tokenizer(text + spec["answer_prefix"], add_special_tokens=False)["input_ids"]


def _eval_rows(run_dir, out, eval_config, n):
    from torchtune_blah.recipes.blah_eval import BlahEvalRecipe

    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(REPO, "configs", eval_config)), OmegaConf.from_dotlist([
        f"run_dir={run_dir}", f"output_dir={out}", "stage=lora", f"dataset.max_examples={n}", "dtype=fp32",
        "batch_size=8", "max_new_tokens=40"]))
    recipe = BlahEvalRecipe(cfg)
    recipe.setup()
    recipe.evaluate()
    with open(os.path.join(out, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f], recipe._records


def _check_export_answers_like_blah_eval(run_dir, export_dir, eval_config, tmp_path, n=32):
    """transformers' greedy generate on the export == blah_eval's answers, question by question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, records = _eval_rows(run_dir, tmp_path / "eval", eval_config, n)
    run_tokenizer = config.instantiate(RunDir(run_dir).read_config().tokenizer)
    pause_ids = json.load(open(os.path.join(export_dir, "blah_prompt.json")))["pause_token_ids"]
    spec = json.load(open(os.path.join(export_dir, "blah_prompt.json")))
    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    stops = sorted(stop_token_ids(run_tokenizer))
    from torchtune_blah.chat_format import chat_format

    fmt = chat_format(run_tokenizer)
    generated = []
    for row, record in zip(rows, records):
        ids = _hf_prompt(tok, spec, record)
        assert ids == answer_prompt(run_tokenizer, record, pause_ids, "single_turn")
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=40, eos_token_id=stops)
        new = out[0, len(ids):].tolist()
        generated.append(new)
        assert ANSWER_PREFIX + fmt.decode([t for t in new if t not in fmt.end_ids]) == row["raw_output"], row["id"]
    assert len(rows) == n
    return generated, records


def _check_logits(run_dir, export_dir, stage, records, tmp_path, quantize_base=None):
    from transformers import AutoModelForCausalLM

    model, pause, tokenizer = _run_model(run_dir, stage, tmp_path, quantize_base)
    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for record in records:
            x = torch.tensor([answer_prompt(tokenizer, record, pause.sequence, "single_turn")])
            ours = model(x)
            theirs = hf(x).logits[..., : ours.shape[-1]]
            worst = max(worst, (ours - theirs).abs().max().item())
    assert worst <= 5e-4, worst
    return model, pause, tokenizer


# ----------------------------------------------------------------------------- tiny run (NF4 QLoRA)


@pytest.fixture(scope="module")
def tiny_export(trained_run, tmp_path_factory):
    return _export(trained_run, tmp_path_factory.mktemp("tiny_export") / "hf", dtype="fp32")


def test_tiny_export_is_a_standard_hf_folder(tiny_export):
    names = set(os.listdir(tiny_export))
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "blah_prompt.json", "README.md"} <= names
    cfg = json.load(open(os.path.join(tiny_export, "config.json")))
    spec = json.load(open(os.path.join(tiny_export, "blah_prompt.json")))
    gen = json.load(open(os.path.join(tiny_export, "generation_config.json")))
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 1056 + 5
    assert gen["suppress_tokens"] == spec["pause_token_ids"] == list(range(1056, 1061))
    assert "<|eot_id|>" in open(os.path.join(tiny_export, "tokenizer_config.json")).read()
    assert not [n for n in os.listdir(os.path.dirname(tiny_export)) if n.endswith(".tmp")]


def test_tiny_export_matches_torchtune_and_blah_eval(trained_run, tiny_export, tmp_path):
    from torchtune_blah.generation import greedy_generate

    generated, records = _check_export_answers_like_blah_eval(trained_run, tiny_export, "demo_cpu_blah_eval.yaml",
                                                              tmp_path)
    model, pause, tokenizer = _check_logits(trained_run, tiny_export, "lora", records[:3], tmp_path)
    # token for token: the torchtune loop's ids for the same prompts
    prompts = [answer_prompt(tokenizer, r, pause.sequence, "single_turn") for r in records]
    ours = greedy_generate(model, prompts, pad_id=tokenizer.pad_id, stop_ids=stop_token_ids(tokenizer),
                           max_new_tokens=40, pause=pause)
    assert [g.tokens for g in ours] == generated


def test_exported_tokenizer_renders_training_ids(tiny_export, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_export)
    pause_ids = json.load(open(os.path.join(tiny_export, "blah_prompt.json")))["pause_token_ids"]
    assert hf.convert_ids_to_tokens(pause_ids) == [f"<blah_{i}>" for i in range(5)]
    for record in load_squad_records("bundled_sample")[:20]:
        for style in ("single_turn", "multi_turn"):
            messages = squad_messages(record, style)
            chat = [{"role": m.role, "content": m.content} for m in messages]
            ids = hf.apply_chat_template(chat, tokenize=True, return_dict=False)
            assert list(ids) == tokenize_chat(tokenizer, messages, pause_ids)[0]


def test_peft_export_of_an_nf4_run_loads_on_the_unmodified_base(trained_run, tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _export(trained_run, tmp_path / "peft", format="peft", dtype="fp32")
    assert json.load(open(out + "/adapter_config.json"))["trainable_token_indices"] == {
        "embed_tokens": list(range(1056, 1061))}
    base = AutoModelForCausalLM.from_pretrained(tiny_base["checkpoint_dir"], dtype=torch.float32)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(out)))
    peft_model = PeftModel.from_pretrained(base, out).eval()
    # The adapter was trained on the NF4 base: PEFT applies it to the unquantized one.
    model, pause, tokenizer = _run_model(trained_run, "lora", tmp_path, quantize_base=False)
    with torch.no_grad():
        for record in load_squad_records("bundled_sample")[:2]:
            x = torch.tensor([answer_prompt(tokenizer, record, pause.sequence, "single_turn")])
            ours = model(x)
            assert (ours - peft_model(x).logits[..., : ours.shape[-1]]).abs().max().item() <= 5e-4


# ----------------------------------------------------------------------------- errors


def test_bad_exports_fail_before_weights_load(trained_run, tmp_path, monkeypatch):
    import torchtune_blah.model as model_module

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(model_module, "load_run_model", no_weights)
    with pytest.raises(ValueError, match="stage=nope|stage must be one of"):
        plan_export(trained_run, tmp_path / "a", stage="nope")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty"):
        plan_export(trained_run, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    with pytest.raises(ExportError, match="format must be one of"):
        plan_export(trained_run, tmp_path / "b", format="gguf")

    # A run with only the embed phase finished: stage=lora is refused.
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(os.path.join(trained_run, "blah_config.yaml"), partial)
    shutil.copytree(os.path.join(trained_run, "embed"), partial / "embed")
    with pytest.raises(ValueError, match="stage=lora: .* no finished phase"):
        plan_export(str(partial), tmp_path / "c", stage="lora")

    # A tokenizer.json beside the tokenizer that is not the run's tokenizer: refused, named.
    cfg = OmegaConf.load(partial / "blah_config.yaml")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(cfg.tokenizer.path, tok_dir / "tokenizer.model")
    shutil.copy(os.path.join(prepared_smollm2_dir(), "tokenizer.json"), tok_dir / "tokenizer.json")
    cfg.tokenizer.path = str(tok_dir / "tokenizer.model")
    OmegaConf.save(cfg, partial / "blah_config.yaml")
    with pytest.raises(ExportError, match="tokenizer: .*tokenizer.json does not encode like the run's tokenizer"):
        plan_export(str(partial), tmp_path / "d", stage="embed")

    # A ChatML tokenizer (torchtune's Qwen2.5 one) without a tokenizer.json to export.
    smol = json.load(open(os.path.join(prepared_smollm2_dir(), "tokenizer.json")))
    qwen_dir = tmp_path / "qwen_tok"
    qwen_dir.mkdir()
    (qwen_dir / "vocab.json").write_text(json.dumps(smol["model"]["vocab"]))
    (qwen_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
        m if isinstance(m, str) else " ".join(m) for m in smol["model"]["merges"]) + "\n")
    cfg.tokenizer = OmegaConf.create({"_component_": "torchtune.models.qwen2_5.qwen2_5_tokenizer",
                                      "path": str(qwen_dir / "vocab.json"), "merges_file": str(qwen_dir / "merges.txt")})
    OmegaConf.save(cfg, partial / "blah_config.yaml")
    with pytest.raises(ExportError, match="needs a Hugging Face tokenizer.json for Qwen2_5Tokenizer"):
        plan_export(str(partial), tmp_path / "e", stage="embed")
    assert not [p for p in os.listdir(tmp_path) if p in ("a", "b", "c", "d", "e")]


def test_a_failed_export_leaves_nothing(trained_run, tmp_path, monkeypatch):
    import torchtune_blah.export as export_module

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export_module, "write_safetensors_shards", disk_full)
    with pytest.raises(OSError, match="No space"):
        _export(trained_run, tmp_path / "out")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """A few fp32 steps of both phases on the real model (adapter and pause rows away from their init)."""
    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    smollm2 = prepared_smollm2_dir()
    out = tmp_path_factory.mktemp("smollm2") / "run"
    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(REPO, "configs", "smollm2_135m_blah.yaml")), OmegaConf.from_dotlist([
        f"output_dir={out}", f"tokenizer.path={smollm2}/tokenizer.json", f"checkpointer.checkpoint_dir={smollm2}",
        "save_adapter_weights_only=true", "dtype=fp32", "embed.max_steps=3", "embed.batch_size=2",
        "lora.max_steps=3", "lora.batch_size=2", "embed.save_every_n_steps=null", "lora.save_every_n_steps=null"]))
    recipe = BlahQLoRARecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    return str(out)


def test_smollm2_export_matches_torchtune_and_blah_eval(smollm2_run, tmp_path):
    out = _export(smollm2_run, tmp_path / "hf")
    _, records = _check_export_answers_like_blah_eval(smollm2_run, out, "smollm2_135m_blah_eval.yaml", tmp_path)
    _check_logits(smollm2_run, out, "lora", records[:2], tmp_path)


def test_smollm2_export_never_emits_pause_tokens_even_with_huge_rows(smollm2_run, tmp_path):
    """The base is tied: a tied export would score the pause tokens with their (here huge) input rows."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "huge"
    shutil.copytree(smollm2_run, run)
    for stage in ("embed", "lora"):
        path = run / stage / "pause_embeddings.safetensors"
        with safe_open(str(path), "pt") as f:
            meta, rows = f.metadata(), f.get_tensor("pause_embeddings")
        save_file({"pause_embeddings": rows * 1000.0}, str(path), metadata=meta)
    out = _export(str(run), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    spec = json.load(open(os.path.join(out, "blah_prompt.json")))
    pause_ids = spec["pause_token_ids"]
    base_table = load_file(os.path.join(prepared_smollm2_dir(), "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(hf.lm_head.weight[:49152], base_table)
    assert torch.count_nonzero(hf.lm_head.weight[49152:]) == 0
    assert hf.model.embed_tokens.weight[pause_ids].norm(dim=-1).min() > 100 * base_table.norm(dim=-1).max()
    leaks = 0
    for record in load_squad_records("bundled_sample")[:32]:
        ids = _hf_prompt(tok, spec, record)
        out_ids = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=8, output_hidden_states=True, return_dict_in_generate=True)
        assert not set(out_ids.sequences[0, len(ids):].tolist()) & set(pause_ids)
        # What a tied output table would have done with these rows: pause ids win.
        hidden = out_ids.hidden_states[0][-1][0, -1]
        leaks += int(int((hf.model.embed_tokens.weight @ hidden).argmax()) in pause_ids)
    assert leaks > 0


def test_smollm2_peft_export_gives_the_same_logits(smollm2_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _export(smollm2_run, tmp_path / "peft", format="peft", dtype="fp32")
    base = AutoModelForCausalLM.from_pretrained(prepared_smollm2_dir(), dtype=torch.float32)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(out)))
    peft_model = PeftModel.from_pretrained(base, out).eval()
    model, pause, tokenizer = _run_model(smollm2_run, "lora", tmp_path)
    with torch.no_grad():
        for record in load_squad_records("bundled_sample")[:2]:
            x = torch.tensor([answer_prompt(tokenizer, record, pause.sequence, "single_turn")])
            ours = model(x)
            assert (ours - peft_model(x).logits[..., : ours.shape[-1]]).abs().max().item() <= 5e-4


# ----------------------------------------------------------------------------- Qwen2 architecture


QWEN2_ARGS = dict(vocab_size=49152, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                  max_seq_len=2048, norm_eps=1e-5, rope_base=1e6, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory):
    """A random-weight Qwen2-architecture base (q/k/v biases, Hugging Face's rotary layout, tied
    embeddings) with SmolLM2's ChatML tokenizer, trained a few steps: the export's Qwen2 paths."""
    from safetensors.torch import save_file
    from torchtune.models.qwen2._component_builders import qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    base = tmp_path_factory.mktemp("qwen2_base")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = qwen2(**QWEN2_ARGS)
    hf = qwen2_tune_to_hf({k: v.contiguous() for k, v in model.state_dict().items()}, num_heads=4, num_kv_heads=2,
                          dim=64, tie_word_embeddings=True)
    save_file(hf, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 49152, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "use_sliding_window": False, "torch_dtype": "float32"}))
    smollm2 = prepared_smollm2_dir()
    out = tmp_path_factory.mktemp("qwen2") / "run"
    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(REPO, "configs", "smollm2_135m_blah.yaml")), OmegaConf.from_dotlist([
        f"output_dir={out}", f"tokenizer.path={smollm2}/tokenizer.json", f"checkpointer.checkpoint_dir={base}",
        "checkpointer.model_type=QWEN2", "save_adapter_weights_only=true", "dtype=fp32", "embed.max_steps=2",
        "embed.batch_size=2", "lora.max_steps=2", "lora.batch_size=2", "lora.optimizer.lr=0.05",
        "embed.save_every_n_steps=null", "lora.save_every_n_steps=null"]))
    cfg.model = OmegaConf.create({
        "_component_": "torchtune.models.qwen2._component_builders.lora_qwen2",
        "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
        "lora_rank": 8, "lora_alpha": 16, **QWEN2_ARGS})
    recipe = BlahQLoRARecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    return str(out), str(base)


def test_qwen2_architecture_exports_match_torchtune(qwen2_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, base_dir = qwen2_run
    records = load_squad_records("bundled_sample")[:2]
    hf_dir = _export(run, tmp_path / "hf")
    assert json.load(open(os.path.join(hf_dir, "config.json")))["model_type"] == "qwen2"
    model, pause, tokenizer = _check_logits(run, hf_dir, "lora", records, tmp_path)
    lora_b = [p for n, p in model.named_parameters() if n.endswith("q_proj.lora_b.weight")]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # the adapter moved: a wrong q/k layout would show

    peft_dir = _export(run, tmp_path / "peft", format="peft", dtype="fp32")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(peft_dir)))
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    with torch.no_grad():
        for record in records:
            x = torch.tensor([answer_prompt(tokenizer, record, pause.sequence, "single_turn")])
            ours = model(x)
            assert (ours - peft_model(x).logits[..., : ours.shape[-1]]).abs().max().item() <= 5e-4
