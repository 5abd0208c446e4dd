"""logits_only_where_loss: the recipe's loss step unembeds only the positions its loss is taken on.
The loss and every trainable gradient (LoRA A/B, the LoRA output projection, the pause rows) are
those of unembedding every position (fp32), with and without chunked output and the embed phase's
prompt cut; the recipe's own ``_loss_step`` runs both ways."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torchtune.data import padded_collate_sft
from torchtune.modules.loss import CEWithChunkedOutputLoss

from torchtune_blah.data.chat import squad_chat_dataset
from torchtune_blah.pause import add_pause_embeddings, pause_tokens
from torchtune_blah.prompt_prefix import first_pause_position, prompt_cut
from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe
from torchtune_blah.tiny import TINY_VOCAB_SIZE, tiny_qlora_llama3
from torchtune_blah.torchtune_patches import contiguous_output_chunks


@pytest.mark.parametrize("chunked,cut", [(False, False), (True, False), (True, True)])
def test_same_loss_and_gradients_as_unembedding_every_position(tokenizer, chunked, cut):
    torch.manual_seed(0)
    model = tiny_qlora_llama3(quantize_base=False, apply_lora_to_output=True)
    pause = pause_tokens(num=5, vocab_size=TINY_VOCAB_SIZE)
    add_pause_embeddings(model, pause)
    for p in model.parameters():
        p.requires_grad_(True)  # every gradient is compared, the base's too
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=4) if chunked else torch.nn.CrossEntropyLoss()
    if chunked:
        contiguous_output_chunks(model, 4)  # as the recipe does
    data = squad_chat_dataset(tokenizer, source="bundled_sample", pause_tokens=pause, max_context_words=80)
    batch = padded_collate_sft([data[i] for i in (0, 7, 19, 33)], padding_idx=tokenizer.pad_id, ignore_idx=-100)
    start = first_pause_position(batch["tokens"], pause) if cut else 0
    ignore = torch.full((4, 1), -100)

    losses, grads = [], []
    for only in (False, True):
        recipe = SimpleNamespace(_loss_fn=loss_fn, _logits_only_where_loss=only, _activations_ctx=nullcontext(),
                                 _model=model)
        model.zero_grad(set_to_none=True)
        with prompt_cut(model, batch["tokens"], start) as rest:
            loss = BlahQLoRARecipe._loss_step(recipe, dict(batch), ignore, rest, start)
            loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    supervised = int((batch["labels"] != -100).sum())
    assert 0 < supervised < 0.2 * batch["labels"].numel()  # the loss is on a small share of the positions
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
    assert grads[0].keys() == grads[1].keys() and any("lora" in n for n in grads[0])
    assert any("output.lora" in n for n in grads[0]) and any("pause_weight" in n for n in grads[0])
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()) + 1e-12), name
