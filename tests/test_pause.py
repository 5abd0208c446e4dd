import os

import pytest
import torch
from torch import nn

from torchtune_blah.pause import (
    PAUSE_EMBEDDINGS_FILE,
    PauseEmbedding,
    add_pause_embeddings,
    find_pause_embedding,
    load_pause_embeddings,
    mask_pause_logits,
    pause_tokens,
    pause_tokens_from_metadata,
    read_pause_embeddings,
    save_pause_embeddings,
)
from torchtune_blah.tiny import TINY_VOCAB_SIZE, tiny_llama3, tiny_qlora_llama3

V = TINY_VOCAB_SIZE


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return tiny_llama3(**kw)


# ----------------------------------------------------------------------------- the spec


def test_append_ids_start_at_the_model_vocab_size():
    spec = pause_tokens(num=5, mode="append", vocab_size=V)
    assert spec.ids == tuple(range(V, V + 5))
    assert spec.names == ("<blah_0>", "<blah_1>", "<blah_2>", "<blah_3>", "<blah_4>")
    assert spec.sequence == list(range(V, V + 5))
    assert spec.name_of(V + 3) == "<blah_3>" and spec.name_of(5) is None


def test_repeated_single_token_variant():
    spec = pause_tokens(num=4, distinct=False, mode="append", vocab_size=V)
    assert spec.ids == (V,) and spec.names == ("<blah>",)
    assert spec.sequence == [V] * 4


def test_reserved_ids_come_from_the_tokenizer(tokenizer):
    spec = pause_tokens(num=3, mode="reserved", tokenizer=tokenizer)
    names = [f"<|reserved_special_token_{10 + i}|>" for i in range(3)]
    assert spec.names == tuple(names)
    assert spec.ids == tuple(tokenizer.special_tokens[n] for n in names)
    assert all(i < V for i in spec.ids)
    custom = pause_tokens(num=2, mode="reserved", tokenizer=tokenizer,
                          reserved_tokens=["<|reserved_special_token_3|>", "<|reserved_special_token_2|>"])
    assert custom.ids == (tokenizer.special_tokens["<|reserved_special_token_3|>"],
                          tokenizer.special_tokens["<|reserved_special_token_2|>"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num=5, mode="append"), "vocab_size is required"),
        (dict(num=5, mode="sideways", vocab_size=V), "mode must be one of"),
        (dict(num=-1, vocab_size=V), "num must be an integer"),
        (dict(num=2, mode="reserved", reserved_tokens=["<|nope|>", "<|reserved_special_token_2|>"]), "not special tokens"),
        (dict(num=2, mode="reserved", reserved_tokens=["<|reserved_special_token_2|>"]), "2 are needed"),
    ],
)
def test_spec_errors_name_the_field(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pause_tokens(tokenizer=tokenizer, **kwargs)


def test_zero_pause_tokens_leave_the_model_alone():
    model = _model()
    assert add_pause_embeddings(model, pause_tokens(num=0)) is None
    assert isinstance(model.tok_embeddings, nn.Embedding)


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("mode", ["append", "reserved"])
def test_lookup_uses_pause_rows_for_pause_ids_and_base_rows_otherwise(tokenizer, mode):
    model = _model()
    base_table = model.tok_embeddings.weight.detach().clone()
    spec = pause_tokens(num=3, mode=mode, vocab_size=V, tokenizer=tokenizer)
    emb = add_pause_embeddings(model, spec, init="normal", init_std=1.0)
    tokens = torch.tensor([[5, spec.ids[2], 17, spec.ids[0], spec.ids[0], 900]])
    out = emb(tokens)
    for pos, row in [(1, 2), (3, 0), (4, 0)]:
        torch.testing.assert_close(out[0, pos], emb.pause_weight[row], rtol=0, atol=0)
    for pos, tok in [(0, 5), (2, 17), (5, 900)]:
        torch.testing.assert_close(out[0, pos], base_table[tok], rtol=0, atol=0)


def test_gradients_reach_only_the_pause_rows_that_were_used():
    model = _model()
    spec = pause_tokens(num=5, vocab_size=V)
    emb = add_pause_embeddings(model, spec, init="normal")
    for p in model.parameters():
        p.requires_grad_(False)
    emb.pause_weight.requires_grad_(True)
    tokens = torch.tensor([[1, 2, V + 0, V + 2, 3, 4], [5, V + 2, 6, 7, 8, 9]])
    logits = model(tokens)
    logits[:, -1].logsumexp(-1).sum().backward()
    grad = emb.pause_weight.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert grad[1].abs().sum() == 0 and grad[3].abs().sum() == 0 and grad[4].abs().sum() == 0
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["tok_embeddings.pause_weight"]


def test_training_pause_rows_leaves_every_other_tensor_bitwise_unchanged():
    model = _model()
    emb = add_pause_embeddings(model, pause_tokens(num=2, vocab_size=V))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pause_before = emb.pause_weight.detach().clone()
    opt = torch.optim.AdamW([emb.pause_weight], lr=1e-2)
    tokens = torch.tensor([[1, 2, V, V + 1, 3, 4]])
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(tokens)[0, :-1], tokens[0, 1:].clamp(max=V - 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(pause_before, emb.pause_weight)


def test_state_dict_keys_unchanged_and_base_checkpoint_loads_strictly():
    model = _model()
    keys = list(model.state_dict())
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    add_pause_embeddings(model, pause_tokens(num=5, vocab_size=V))
    assert list(model.state_dict()) == keys
    fresh = _model(seed=1)
    add_pause_embeddings(fresh, pause_tokens(num=5, vocab_size=V))
    fresh.load_state_dict(base_sd, strict=True)
    torch.testing.assert_close(fresh.tok_embeddings.weight, base_sd["tok_embeddings.weight"])


def test_tied_output_keeps_the_base_table_only():
    model = _model(tie_word_embeddings=True)
    base_module = model.tok_embeddings
    emb = add_pause_embeddings(model, pause_tokens(num=5, vocab_size=V))
    assert model.output.tied_module is emb  # FSDP2 swaps emb.weight for its shards: the output must follow
    assert emb.weight is base_module.weight  # one table, shared, not copied
    logits = model(torch.tensor([[1, 2, V, V + 4, 3]]))
    assert logits.shape[-1] == V  # no row for any pause id: they cannot be generated


def test_append_pause_ids_cannot_be_generated():
    model = _model()
    spec = pause_tokens(num=5, vocab_size=V)
    add_pause_embeddings(model, spec)
    logits = model(torch.tensor([[1, V, V + 1, 2]]))
    assert logits.shape[-1] == V and min(spec.ids) >= logits.shape[-1]


def test_reserved_pause_ids_are_masked_for_generation(tokenizer):
    spec = pause_tokens(num=3, mode="reserved", tokenizer=tokenizer)
    logits = torch.zeros(2, 4, V)
    logits[..., spec.ids[1]] = 100.0  # the model "wants" a pause token
    mask_pause_logits(logits, spec)
    assert torch.isinf(logits[..., list(spec.ids)]).all()
    assert not set(logits.argmax(-1).flatten().tolist()) & set(spec.ids)
    assert torch.isfinite(logits[..., 0]).all()


def test_init_methods(tokenizer):
    model = _model()
    table = model.tok_embeddings.weight.detach().clone()
    emb = add_pause_embeddings(model, pause_tokens(num=2, vocab_size=V))
    torch.testing.assert_close(emb.pause_weight[1], table.mean(0))

    model = _model()
    token_id = tokenizer.encode("the", add_bos=False, add_eos=False)
    assert len(token_id) == 1
    emb = add_pause_embeddings(model, pause_tokens(num=2, vocab_size=V), init="copy", init_token="the",
                               tokenizer=tokenizer)
    torch.testing.assert_close(emb.pause_weight[0], table[token_id[0]])

    torch.manual_seed(0)
    emb = add_pause_embeddings(_model(), pause_tokens(num=64, vocab_size=V), init="normal", init_std=0.02)
    assert 0.015 < emb.pause_weight.std().item() < 0.025

    with pytest.raises(ValueError, match="init must be one of"):
        add_pause_embeddings(_model(), pause_tokens(num=1, vocab_size=V), init="zeros")
    with pytest.raises(ValueError, match="name a single token"):
        add_pause_embeddings(_model(), pause_tokens(num=1, vocab_size=V), init="copy",
                             init_token="antidisestablishmentarianism", tokenizer=tokenizer)


def test_vocab_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=f"set pause_tokens.vocab_size={V}"):
        add_pause_embeddings(_model(), pause_tokens(num=5, vocab_size=V + 7))


def test_works_on_an_nf4_qlora_model():
    torch.manual_seed(0)
    model = tiny_qlora_llama3()
    emb = add_pause_embeddings(model, pause_tokens(num=5, vocab_size=V))
    logits = model(torch.tensor([[1, 2, V, V + 1, V + 2, V + 3, V + 4, 3]]))
    logits[0, -1].logsumexp(-1).backward()
    assert emb.pause_weight.grad is not None and emb.pause_weight.grad.abs().sum() > 0
    assert find_pause_embedding(model) is emb


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_with_metadata(tmp_path):
    model = _model()
    spec = pause_tokens(num=5, vocab_size=V)
    emb = add_pause_embeddings(model, spec, init="normal")
    path = save_pause_embeddings(emb, str(tmp_path))
    assert path == str(tmp_path / PAUSE_EMBEDDINGS_FILE)
    assert os.listdir(tmp_path) == [PAUSE_EMBEDDINGS_FILE]  # no temporary file left behind
    rows, meta = read_pause_embeddings(path)
    assert meta["mode"] == "append" and meta["ids"] == list(spec.ids) and meta["names"] == list(spec.names)
    assert meta["dim"] == 256 and meta["base_vocab_size"] == V and meta["num"] == 5
    assert pause_tokens_from_metadata(meta) == spec

    other = add_pause_embeddings(_model(seed=3), spec)
    load_pause_embeddings(other, str(tmp_path))
    torch.testing.assert_close(other.pause_weight, emb.pause_weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    "other_spec, other_dim, message",
    [
        (dict(num=4, vocab_size=V), 256, "num: file has 5, model has 4"),
        (dict(num=5, mode="reserved"), 256, "mode: file has 'append', model has 'reserved'"),
        (dict(num=5, vocab_size=V), 512, "dim: file has 256, model has 512"),
    ],
)
def test_mismatched_file_fails_clearly(tmp_path, tokenizer, other_spec, other_dim, message):
    emb = add_pause_embeddings(_model(), pause_tokens(num=5, vocab_size=V))
    save_pause_embeddings(emb, str(tmp_path))
    torch.manual_seed(0)
    other_model = tiny_llama3(embed_dim=other_dim, num_heads=4, num_kv_heads=2)
    other = add_pause_embeddings(other_model, pause_tokens(tokenizer=tokenizer, **other_spec))
    with pytest.raises(ValueError, match=message):
        load_pause_embeddings(other, str(tmp_path))


def test_missing_or_foreign_file(tmp_path):
    emb = add_pause_embeddings(_model(), pause_tokens(num=1, vocab_size=V))
    with pytest.raises(FileNotFoundError, match="no pause embeddings"):
        load_pause_embeddings(emb, str(tmp_path))
    from safetensors.torch import save_file

    save_file({"something": torch.zeros(2)}, str(tmp_path / PAUSE_EMBEDDINGS_FILE))
    with pytest.raises(ValueError, match="is it a pause_embeddings file"):
        load_pause_embeddings(emb, str(tmp_path))


def test_pause_embedding_repr_names_the_ids():
    emb = PauseEmbedding(nn.Embedding(10, 4), pause_tokens(num=2, vocab_size=10), torch.zeros(2, 4))
    assert "pause_ids=[10, 11]" in repr(emb)
