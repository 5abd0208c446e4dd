"""torchtune_blah.torchtune_patches: the chunked output projection on contiguous chunks, and the version guard of every patch."""

import torch

from torchtune_blah.torchtune_patches import contiguous_output_chunks
from torchtune_blah.tiny import tiny_llama3


def test_contiguous_output_chunks_give_torchtunes_logits_and_gradients():
    torch.manual_seed(0)
    theirs, ours = tiny_llama3(), tiny_llama3()
    ours.load_state_dict(theirs.state_dict())
    theirs.set_num_output_chunks(4)
    contiguous_output_chunks(ours, 4)
    seen = {id(theirs): [], id(ours): []}
    for model in (theirs, ours):
        model.output.register_forward_pre_hook(lambda module, args, m=model: seen[id(m)].append(args[0].is_contiguous()))
    tokens = torch.randint(0, 200, (3, 37))
    logits = [model(tokens) for model in (theirs, ours)]
    assert seen[id(theirs)] == [False] * 4  # batch 3: torchtune's chunks are strided views
    assert seen[id(ours)] == [True] * 4
    for a, b in zip(*logits):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    for model, out in zip((theirs, ours), logits):
        sum(chunk.square().mean() for chunk in out).backward()
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert "chunked_output" not in str(list(ours.state_dict()))


def test_patches_refuse_another_torchtune(monkeypatch):
    """Each change inside torchtune's objects was written for 0.6.1: another version is an error
    naming the patch, never a silent change."""
    import pytest
    import torchtune

    from torchtune_blah.tiny import tiny_llama3
    from torchtune_blah.torchtune_patches import WRITTEN_FOR, contiguous_output_chunks, unembed_last_position

    model = tiny_llama3()
    monkeypatch.setattr(torchtune, "__version__", "0.7.0")
    with pytest.raises(RuntimeError, match=f"'contiguous_output_chunks' was written for torchtune {WRITTEN_FOR}"):
        contiguous_output_chunks(model, 4)
    with pytest.raises(RuntimeError, match="unembed_last_position"):
        with unembed_last_position(model):
            pass
    with pytest.raises(TypeError, match="expects a torchtune TransformerDecoder"):
        monkeypatch.setattr(torchtune, "__version__", WRITTEN_FOR)
        contiguous_output_chunks(torch.nn.Linear(2, 2), 4)
