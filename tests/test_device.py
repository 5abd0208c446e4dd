"""Device correctness without a GPU: a tensor our code creates on the wrong device fails here.

On a GPU, ``torch.zeros(n)`` without ``device=`` makes a CPU tensor that fails the first op it
meets a CUDA tensor in; on a CPU it passes silently. So these tests make the default device
``meta`` while the steps run (torchtune_blah.estimate.tensors_without_device_on_meta): such a
tensor is then a meta tensor, and meta refuses to meet the model's CPU tensors.

- Every GPU config, at full width and vocabulary with one decoder layer, on fake tensors
  (``blah_estimate``'s path): the embed step with and without the prompt cut, the LoRA step, an
  in-training validation batch and a blah_eval batch (pre-fill into the KV cache, one decoding step).
- What needs real data (greedy decoding's bookkeeping, the abstention probes and the threshold
  rule, the cut's shared prefix read off the tokens) on a tiny real model.
- A planted bug, ``torch.zeros`` without a device in ``PauseEmbedding.forward``, fails both.
"""

import os

import pytest
import torch
from omegaconf import OmegaConf

from torchtune_blah.estimate import tensors_without_device_on_meta
from torchtune_blah.pause import PauseEmbedding
from torchtune_blah.recipes.blah_estimate import BlahEstimateRecipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GPU_CONFIGS = ["llama3_8b_blah", "llama3_8b_blah_2gpu", "llama3_3_70b_blah", "llama3_2_1b_blah",
               "qwen2_5_1_5b_blah", "qwen2_5_3b_blah", "smollm2_1_7b_blah"]


def _estimate(name, **overrides):
    cfg = OmegaConf.load(os.path.join(REPO, "configs", f"{name}.yaml"))
    # One layer at full width and vocabulary; short sequences keep it to seconds.
    extra = {"layers": 1, "tokenizer": {"max_seq_len": 96}, "reply_tokens": 8, "eval_batch_size": 2,
             "eval_max_new_tokens": 4, **overrides}
    cfg = OmegaConf.merge(cfg, OmegaConf.create(extra))
    return BlahEstimateRecipe(cfg).run()


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_every_gpu_config_steps_and_answers_with_tensors_on_the_model_device(name):
    estimates = _estimate(name, validation={"every_n_steps": 1, "batch_size": 2, "max_new_tokens": 4})
    kinds = [e.name.split(":")[0] for e in estimates]
    assert kinds == ["embed", "lora", "validation answering", "blah_eval answering"]
    for e in estimates:
        assert e.parameters > 0 and e.activations > 0 and e.flops > 0, e
    embed, lora = estimates[:2]
    assert lora.gradients > 0 and lora.optimizer_state > 0
    assert embed.gradients > 0  # the pause rows


@pytest.mark.parametrize("name", ["llama3_8b_blah", "llama3_2_1b_blah", "qwen2_5_1_5b_blah"])
def test_embed_step_without_the_prompt_cut(name):
    cut, = _estimate(name, phases=["embed"], validation=None, embed={"backward_from_first_pause": True})[:1]
    full, = _estimate(name, phases=["embed"], validation=None, embed={"backward_from_first_pause": False})[:1]
    assert "prompt cut" in cut.name and "prompt cut" not in full.name
    assert full.flops > cut.flops  # the prompt's backward pass is only in the full step


def _plant_cpu_tensor(monkeypatch):
    forward = PauseEmbedding.forward

    def planted(self, tokens):
        out = forward(self, tokens)
        return out + torch.zeros(out.shape[-1], dtype=out.dtype)  # harmless on a CPU, fatal on a GPU
    monkeypatch.setattr(PauseEmbedding, "forward", planted)


def test_a_tensor_created_without_a_device_fails_the_estimate(monkeypatch):
    _estimate("llama3_8b_blah", validation=None)  # passes as shipped
    _plant_cpu_tensor(monkeypatch)
    with pytest.raises(Exception, match="(?i)device"):
        _estimate("llama3_8b_blah", validation=None)


# ---------------------------------------------------------------- real data, tiny model


@pytest.fixture
def tiny_answerer(tokenizer):
    from torchtune_blah.eval.run import Answerer
    from torchtune_blah.pause import add_pause_embeddings, pause_tokens
    from torchtune_blah.tiny import TINY_VOCAB_SIZE, tiny_qlora_llama3

    torch.manual_seed(0)
    model = tiny_qlora_llama3()
    pause = pause_tokens(num=5, vocab_size=TINY_VOCAB_SIZE)
    add_pause_embeddings(model, pause)
    model.eval()

    def make(abstention):
        return Answerer(model, tokenizer, pause, prompt_style="single_turn", max_new_tokens=6, abstention=abstention)
    return make


@pytest.fixture
def records():
    from torchtune_blah.data.squad import load_squad_records

    return load_squad_records("bundled_sample")[:3]


@pytest.mark.parametrize("abstention", [None, ("p_abstain", 0.5), ("abstain_vs_span", 0.0)])
def test_answering_creates_every_tensor_on_the_model_device(tiny_answerer, records, abstention):
    answerer = tiny_answerer(abstention)
    with tensors_without_device_on_meta():
        rows = answerer.answer(records, scored=True)
    assert len(rows) == len(records)


def test_planted_cpu_tensor_fails_real_answering(tiny_answerer, records, monkeypatch):
    _plant_cpu_tensor(monkeypatch)
    with pytest.raises(Exception, match="(?i)device"):
        with tensors_without_device_on_meta():
            tiny_answerer(("p_abstain", 0.5)).answer(records, scored=True)


def test_prompt_cut_reads_the_shared_prefix_with_tensors_on_the_model_device(tokenizer):
    from torchtune_blah.pause import PAUSE_PARAM, add_pause_embeddings, pause_tokens
    from torchtune_blah.prompt_prefix import first_pause_position, prompt_cut
    from torchtune_blah.tiny import TINY_VOCAB_SIZE, tiny_llama3

    torch.manual_seed(0)
    model = tiny_llama3()
    pause = pause_tokens(num=5, vocab_size=TINY_VOCAB_SIZE)
    add_pause_embeddings(model, pause)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(PAUSE_PARAM))
    tokens = torch.randint(0, TINY_VOCAB_SIZE, (3, 40))
    tokens[:, :10] = tokens[0, :10]  # a common beginning, run once at batch size 1
    tokens[:, 30:35] = torch.tensor(pause.ids)
    with tensors_without_device_on_meta():
        start = first_pause_position(tokens, pause)
        with prompt_cut(model, tokens, start) as rest:
            rest().float().sum().backward()
    assert start == 30 and model.tok_embeddings.pause_weight.grad.abs().sum() > 0
