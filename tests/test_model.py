"""torchtune_blah.model: the chunked output projection on contiguous chunks."""

import torch

from torchtune_blah.model import set_num_output_chunks
from torchtune_blah.tiny import tiny_llama3


def test_contiguous_output_chunks_give_torchtunes_logits_and_gradients():
    torch.manual_seed(0)
    theirs, ours = tiny_llama3(), tiny_llama3()
    ours.load_state_dict(theirs.state_dict())
    theirs.set_num_output_chunks(4)
    set_num_output_chunks(ours, 4)
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
