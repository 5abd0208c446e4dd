"""The embed phase's cut: the prompt before the first pause id without autograd gives the pause
rows the gradients of the full backward pass (fp32, both prompt styles)."""

import pytest
import torch
from torchtune.data import padded_collate_sft
from torchtune.modules.loss import CEWithChunkedOutputLoss

from torchtune_blah.data.chat import squad_chat_dataset
from torchtune_blah.torchtune_patches import contiguous_output_chunks
from torchtune_blah.pause import PAUSE_PARAM, add_pause_embeddings, pause_tokens
from torchtune_blah.prompt_prefix import first_pause_position, prompt_cut
from torchtune_blah.tiny import TINY_VOCAB_SIZE, tiny_llama3


def _loss(logits, batch, start, chunked):
    labels = batch["labels"]
    labels = torch.hstack((labels[:, 1:], torch.full((labels.shape[0], 1), -100)))[:, start:]
    if chunked:
        return CEWithChunkedOutputLoss(num_output_chunks=4)(logits, labels)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100)


@pytest.mark.parametrize("style,chunked,checkpointing", [("single_turn", False, False), ("multi_turn", False, False),
                                                       ("single_turn", True, False), ("single_turn", False, True)])
def test_pause_row_gradients_equal_the_full_backward_pass(tokenizer, style, chunked, checkpointing):
    torch.manual_seed(0)
    model = tiny_llama3()
    if checkpointing:  # the layers are recomputed in the backward pass, inside the cut
        from torchtune import training
        from torchtune.modules import TransformerSelfAttentionLayer

        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    pause = pause_tokens(num=5, vocab_size=TINY_VOCAB_SIZE)
    module = add_pause_embeddings(model, pause)
    if chunked:
        contiguous_output_chunks(model, 4)  # as the recipe does
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(PAUSE_PARAM))
    data = squad_chat_dataset(tokenizer, source="bundled_sample", pause_tokens=pause, prompt_style=style,
                              max_context_words=80)
    batch = padded_collate_sft([data[i] for i in (0, 7, 19, 33)], padding_idx=tokenizer.pad_id, ignore_idx=-100)
    start = first_pause_position(batch["tokens"], pause)
    lengths = (batch["tokens"] != tokenizer.pad_id).sum(dim=1)
    assert 0.6 * int(lengths.min()) < start < int(lengths.min())  # most of the prompt is cut off
    from torchtune_blah.generation import common_prefix_length

    assert 0 < common_prefix_length(batch["tokens"].tolist()) < start  # the shared system prompt runs once, at batch size 1

    grads, losses = [], []
    for cut in (0, start):
        module.pause_weight.grad = None
        with prompt_cut(model, batch["tokens"], cut) as rest:
            loss = _loss(rest() if rest else model(batch["tokens"]), batch, cut, chunked)
            loss.backward()
        losses.append(loss.detach())
        grads.append(module.pause_weight.grad.clone())
    assert not model.caches_are_setup()  # the cut leaves the model as it found it
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-5 * float(grads[0].abs().max()))
    # in the two-turn style the cut is at the *first* assistant turn's pause ids
    if style == "multi_turn":
        row = batch["tokens"][0].tolist()
        assert sum(t in pause.ids for t in row) == 2 * pause.num and row.index(pause.ids[0]) >= start


def test_no_pause_ids_no_cut():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert first_pause_position(tokens, pause_tokens(num=0)) == 0
    assert first_pause_position(tokens, pause_tokens(num=2, vocab_size=2)) == 0  # id 2 only in row 0
    assert first_pause_position(torch.tensor([[1, 9, 3], [9, 5, 6]]), pause_tokens(num=1, vocab_size=9)) == 0
    assert first_pause_position(torch.tensor([[1, 1, 9], [1, 9, 6]]), pause_tokens(num=1, vocab_size=9)) == 1
