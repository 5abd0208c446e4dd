"""torchtune_patches.rms_norm_fp32_weight: the same output as torchtune's RMSNorm, through the fused kernel."""

import torch
import torch.nn.functional as F
from torchtune.modules import RMSNorm

from torchtune_blah.tiny import tiny_llama3
from torchtune_blah.torchtune_patches import rms_norm_fp32_weight


def test_rms_norm_with_an_fp32_weight_is_torchtunes_norm_with_matching_dtypes(monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama3().to(torch.bfloat16).eval()
    for m in model.modules():
        if isinstance(m, RMSNorm):
            torch.nn.init.normal_(m.scale)  # not all ones: the weight's rounding would show
    tokens = torch.randint(0, 200, (2, 24))
    seen = []
    rms_norm = F.rms_norm

    def recording(x, normalized_shape, weight=None, eps=None):  # the dtypes the kernel is handed
        seen.append((x.dtype, weight.dtype))
        return rms_norm(x, normalized_shape, weight, eps)

    monkeypatch.setattr(F, "rms_norm", recording)
    with torch.inference_mode():
        before = model(tokens)
        assert set(seen) == {(torch.float32, torch.bfloat16)}  # torchtune's: mismatched, no fused kernel
        seen.clear()
        rms_norm_fp32_weight(model)
        after = model(tokens)
    assert set(seen) == {(torch.float32, torch.float32)}
    assert torch.equal(before, after)
    assert "scale" in dict(model.norm.named_parameters())  # the state dict is untouched
