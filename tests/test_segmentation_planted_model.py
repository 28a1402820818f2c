"""The planted test through a real tiny SD3 transformer and the real capture processors.

The image has three colour regions (cat, giraffe, sky; non-square, asymmetric). We run the segmenter once
to record the expert block's inputs, then set that block's image-query projection ``to_q`` (least squares
on the recorded, normalised image hidden states) so that each region's queries point at the keys of its
class's tokens in the prompt, found by searching the class's own token ids in the prompt's ids (not through
the segmenter's column mapping). A second run must recover the regions: prompt -> capture at the expert
layer -> token columns -> grid orientation -> upsampling -> argmax, all real code. The timestep is
overridden to the last (least noisy) step so that the least-squares plant is nearly exact.
"""
import numpy as np
import pytest
import torch

from seg4diff_fast.segmentation import Segmenter, tiny_pipeline

try:
    from seg4diff_fast.capture import capture  # noqa: F401
    HAVE_CAPTURE = True
except ImportError:
    HAVE_CAPTURE = False

CLASSES = ["cat", "giraffe", "sky"]
COLOURS = {"cat": (0.9, 0.1, 0.1), "giraffe": (0.1, 0.8, 0.2), "sky": (0.2, 0.3, 0.95)}


def region_of(y, x):
    if x >= 0.6:
        return "giraffe"
    if y < 0.5 and x < 0.3:
        return "cat"
    return "sky"


@pytest.mark.skipif(not HAVE_CAPTURE, reason="needs seg4diff_fast.capture (capture branch)")
def test_planted_sd3_transformer():
    H, W = 48, 80
    img = torch.zeros(3, H, W)
    gt = np.zeros((H, W), np.int64)
    for i in range(H):
        for j in range(W):
            n = region_of((i + 0.5) / H, (j + 0.5) / W)
            img[:, i, j] = torch.tensor(COLOURS[n])
            gt[i, j] = CLASSES.index(n)
    pipe = tiny_pipeline("sd3")
    seg = Segmenter(pipe, size=None, layers=(1,), timestep_index=-1)
    block = pipe.transformer.transformer_blocks[1]
    seen = {}
    hook = block.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    before = seg.segment(img, CLASSES)
    hook.remove()
    assert (before.labels == gt).mean() < 0.8  # random weights do not already segment

    with torch.no_grad():
        x = block.norm1(seen["hidden_states"], emb=seen["temb"])[0][0]  # [N_img, D] image hidden states
        c = block.norm1_context(seen["encoder_hidden_states"], emb=seen["temb"])[0][0]  # [154, D] text
        keys = block.attn.add_k_proj(c)  # [154, heads * d]
        heads = block.attn.heads
        d = keys.shape[1] // heads
        tok = pipe.tokenizer
        ids = tok(" ".join(CLASSES), padding="max_length", max_length=77)["input_ids"]

        def find(sub):
            return next(list(range(s, s + len(sub))) for s in range(len(ids)) if ids[s:s + len(sub)] == sub)

        cols = {n: find(tok(n, add_special_tokens=False)["input_ids"]) for n in CLASSES}
        gh, gw = H // seg.patch, W // seg.patch
        target = torch.zeros(gh * gw, keys.shape[1])
        for r in range(gh):
            for q in range(gw):
                k = keys[cols[region_of((r + 0.5) / gh, (q + 0.5) / gw)]].mean(0).reshape(heads, d)
                target[r * gw + q] = (60.0 * k / k.norm(dim=-1, keepdim=True)).reshape(-1)
        X = torch.cat([x, torch.ones(x.shape[0], 1)], 1).double()
        sol = torch.linalg.lstsq(X, target.double()).solution  # [D + 1, heads * d]
        block.attn.to_q.weight.copy_(sol[:-1].T.float())
        block.attn.to_q.bias.copy_(sol[-1].float())

    after = seg.segment(img, CLASSES)
    assert after.labels.shape == (H, W)
    acc = (after.labels == gt).mean()
    ious = [((after.labels == k) & (gt == k)).sum() / ((after.labels == k) | (gt == k)).sum() for k in range(3)]
    assert acc > 0.95 and min(ious) > 0.85, (acc, ious)
