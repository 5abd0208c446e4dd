"""Batched greedy decoding: the shared-prefix pre-fill gives the answers the plain batched path
gives (random-weight tiny model, fp32, real SQuAD prompts of several lengths)."""

import pytest
import torch

from torchtune_blah.data.chat import answer_prompt
from torchtune_blah.data.squad import load_squad_records
from torchtune_blah.eval.run import abstention_probe, answer_records
from torchtune_blah.generation import common_prefix_length, greedy_generate, stop_token_ids
from torchtune_blah.pause import NO_PAUSE, add_pause_embeddings, pause_tokens
from torchtune_blah.tiny import TINY_VOCAB_SIZE, tiny_llama3


PAUSE = pause_tokens(num=3, vocab_size=TINY_VOCAB_SIZE)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_llama3()
    add_pause_embeddings(m, PAUSE)  # (randomly initialised rows: the pause ids take part as in a run)
    m.eval()
    return m


def test_common_prefix_leaves_every_row_its_own_tokens():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # at least one id each to pre-fill
    assert common_prefix_length([[7], [7, 8]]) == 0


@pytest.mark.parametrize("style", ["single_turn", "multi_turn"])
def test_shared_prefix_gives_the_same_answers(model, tokenizer, style):
    records = load_squad_records("bundled_sample")[::50][:6]
    pause = PAUSE
    kwargs = dict(prompt_style=style, stop_ids=stop_token_ids(tokenizer), probe=abstention_probe(tokenizer),
                  max_new_tokens=12)
    for abstention in (None, ("p_abstain", 0.5)):
        shared = answer_records(model, tokenizer, records, pause, abstention=abstention, **kwargs)
        plain = answer_records(model, tokenizer, records, pause, abstention=abstention, share_prefix=False, **kwargs)
        assert [r["raw_output"] for r in shared] == [r["raw_output"] for r in plain]
        for s, p in zip(shared, plain):
            assert s["na_prob"] == pytest.approx(p["na_prob"], abs=1e-4)
    prompts = [answer_prompt(tokenizer, r, pause.sequence, style) for r in records]
    assert len({len(p) for p in prompts}) > 3 and common_prefix_length(prompts) > 0.3 * min(map(len, prompts))


def test_shared_prefix_probe_and_span_logprob_match(model, tokenizer):
    records = load_squad_records("bundled_sample")[1::40][:5]
    prompts = [answer_prompt(tokenizer, r, []) for r in records]
    kwargs = dict(pad_id=tokenizer.pad_id, stop_ids=set(), max_new_tokens=8, pause=NO_PAUSE, probe=(2, (5, 17)),
                  probe_mask=True)
    a = greedy_generate(model, prompts, share_prefix=True, **kwargs)
    b = greedy_generate(model, prompts, share_prefix=False, **kwargs)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.probe_argmax == y.probe_argmax
        assert x.probe_prob == pytest.approx(y.probe_prob, abs=1e-5)
        assert x.span_logprob == pytest.approx(y.span_logprob, abs=1e-4)


def test_last_position_only_gives_the_full_outputs_last_logits(model, tokenizer):
    from torchtune_blah.generation import last_logits
    from torchtune_blah.torchtune_patches import unembed_last_position

    records = load_squad_records("bundled_sample")[:3]
    prompts = [answer_prompt(tokenizer, r, PAUSE.sequence) for r in records]
    tokens = torch.tensor([p[:40] for p in prompts])
    with torch.no_grad():
        full = model(tokens)
        with unembed_last_position(model):
            last = model(tokens)
        assert last.shape == (3, 1, full.shape[-1]) and torch.allclose(last[:, -1], last_logits(full), atol=1e-5)
        assert model(tokens).shape == full.shape  # the model unembeds every position again
    # and decoding with it writes what the cache-free, whole-logits path writes (fp32)
    probe = abstention_probe(tokenizer)
    kwargs = dict(pad_id=tokenizer.pad_id, stop_ids=set(), max_new_tokens=probe.step + 4,
                  pause=PAUSE, probe=(probe.step, probe.token))
    for fast, slow in zip(greedy_generate(model, prompts, **kwargs), greedy_generate(model, prompts, use_cache=False,
                                                                                    **kwargs)):
        assert fast.tokens == slow.tokens and fast.probe_prob == pytest.approx(slow.probe_prob, abs=1e-4)
        assert fast.probe_prob is not None


def test_single_query_attention_is_the_attention_of_a_decoding_step_in_bf16():
    """torchtune_patches.single_query_attention: one query per row in bf16 on the CPU goes through two
    matmuls (torch's CPU flash kernel is slow there), within bf16 rounding of the fp32 attention;
    everything else still goes to torchtune's SDPA call; greedy_generate's decoding steps use it."""
    import torch.nn.functional as F

    from torchtune.modules import MultiHeadAttention
    from torchtune_blah.torchtune_patches import single_query_attention

    torch.manual_seed(0)
    model = tiny_llama3().to(torch.bfloat16).eval()
    layer = next(m for m in model.modules() if isinstance(m, MultiHeadAttention))
    original = layer._attention_call
    q, k, v = (torch.randn(3, 4, n, 16, dtype=torch.bfloat16) for n in (1, 40, 40))
    mask = torch.ones(3, 1, 40, dtype=torch.bool)
    mask[0, :, 30:] = False  # row 0: a cache filled up to 30
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None])
    sdpa = original(q, k, v, mask=mask, dropout_p=0.0, is_causal=False)
    with single_query_attention(model):
        ours = layer._attention_call(q, k, v, mask=mask, dropout_p=0.0, is_causal=False)
        assert layer._attention_call is not original
        prefill = torch.randn(3, 4, 5, 16, dtype=torch.bfloat16)  # 5 queries: torchtune's call, unchanged
        assert torch.equal(layer._attention_call(prefill, k, v, mask=mask.expand(3, 5, 40), dropout_p=0.0,
                                                 is_causal=False),
                           original(prefill, k, v, mask=mask.expand(3, 5, 40), dropout_p=0.0, is_causal=False))
    assert layer._attention_call is original  # restored
    err_ours, err_sdpa = (float((x.float() - reference).abs().max()) for x in (ours, sdpa))
    assert err_ours < 0.02 and err_sdpa < 0.02, (err_ours, err_sdpa)
    masked_out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # row 0 ignoring its mask
    assert float((ours[0].float() - masked_out[0]).abs().max()) > 0.05  # the mask is honoured

    calls = []
    real = MultiHeadAttention.forward

    def counting(self, *args, **kwargs):
        calls.append(self._attention_call.func.__name__ if hasattr(self._attention_call, "func") else "sdpa")
        return real(self, *args, **kwargs)

    MultiHeadAttention.forward = counting
    try:
        greedy_generate(model, [[5, 6, 7, 8], [5, 6, 9]], pad_id=0, stop_ids={1}, max_new_tokens=3)
    finally:
        MultiHeadAttention.forward = real
    assert "attention" in calls  # decoding ran under the patch
