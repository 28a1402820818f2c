"""Segmentation end to end on the tiny random-weight pipeline of EVERY family record with a ``segment`` (every name of
``tiny_models()``: SD3, SD3.5, Flux.1, Flux.2 [klein] / [dev], Chroma, Ovis-Image, LongCat-Image, Qwen-Image,
CogView4, CogView3-Plus, CogVideoX 1.0 / 1.5, HiDream, HunyuanImage, HunyuanVideo, HunyuanVideo 1.5) and every other
pipeline a record names (Flux.1 Kontext, CogVideoX video-to-video: on the family's first tiny pipeline's components),
through the one description that reads the record. A new record with a
``segment`` and a tiny pipeline is tested here with no edit: what differs per family (the tokenizer whose tokens are
the columns, the template head before them) is read from the record. Capture's checks of every record:
tests/test_capture_family_records.py; what is special to one family: tests/test_segmentation_families.py.

Each: labels shape / dtype / range, finite scores of the right shape; the columns hold the class names' tokens of what
the text encoder saw; the text block the Segmenter reads is the whole block the transformer sees (families that know
its length); and the scores equal the head-mean i2t maps of an INDEPENDENT capture (``register`` on the same layer
with the ``"reference"`` backend: the explicit full softmax of :mod:`seg4diff_fast.reference`, full forward, every text
column) averaged over each class's columns and resampled bilinearly, with the same labels (same seed, same noise).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg4diff_fast.capture import register
from seg4diff_fast.capture.families import FAMILIES, by_name
from seg4diff_fast.segmentation.segmenter import Segmenter
from seg4diff_fast.segmentation.tiny import tiny_models, tiny_pipeline

CLASSES = ["cat", "grass", "sky", "traffic light"]
TINY = tiny_models()  # {name: (protocol, family, Tiny)}
# a record's pipelines with no tiny pipeline of their own -> the family's first tiny pipeline (its components)
OTHER = {p: next(iter(r.segment.tiny)) for r in FAMILIES if r.segment for p in r.segment.pipelines
         if p not in {t.pipeline for t in r.segment.tiny.values()}}
CASES = sorted(TINY) + sorted(OTHER)
SIZE = 32


def text_ids(seg):
    """Spy on the text encoder whose tokens are the columns (the one paired with the protocol's tokenizer, as diffusers
    names them: ``tokenizer_3`` -> ``text_encoder_3``): ``(ids, hook, drop)``, the ids it is called with (one tensor a
    call), the hook to remove, and how many of them precede the transformer's text block (the record's
    ``text_head``)."""
    ids = []
    encoder = getattr(seg.pipe, seg.protocol.tokenizer.replace("tokenizer", "text_encoder"))
    hook = encoder.register_forward_pre_hook(
        lambda m, a, k: ids.append((k.get("input_ids") if k.get("input_ids") is not None else a[0]).clone()),
        with_kwargs=True)
    return ids, hook, seg.spec.text_head(seg.pipe, seg.tokenizer)


def build_case(name):
    """The tiny pipeline ``name`` (a name of ``tiny_models()``, or a pipeline class of ``OTHER``: that pipeline on
    its family's tiny components)."""
    if name in OTHER:
        import diffusers

        from seg4diff_fast.segmentation.tiny import _eval

        return _eval(getattr(diffusers, name)(**tiny_pipeline(OTHER[name]).components))
    return tiny_pipeline(name)


def _protocol(name) -> str:
    return TINY[OTHER.get(name, name)][0]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    return request.param, build_case(request.param)


def reference_source(seen):
    """An attention source that captures on its own, with the reference backend: every text column, full forward."""

    def source(batch):
        handle = register(batch.transformer, layers=list(batch.layers), capture="i2t", heads="mean",
                          map_dtype=torch.float32, batch="all", backend="reference")
        try:
            batch.run()
        finally:
            handle.remove()
        maps = torch.stack([m.float() for m in handle.store.maps.values()]).mean(0)  # [B, N_img, T_all]
        seen.append((batch, maps))
        return maps[..., batch.text_index]

    return source


def _data(video: bool):
    rng = np.random.RandomState(3)
    if video:
        return rng.randint(0, 256, (6, 27, 21, 3), dtype=np.uint8)  # 6 frames: padded to 1 + 4k
    return rng.randint(0, 256, (27, 21, 3), dtype=np.uint8)


def _segment(seg, data):
    return seg.segment_video(data, CLASSES) if seg.spec.video else seg.segment(data, CLASSES)


def test_every_record_with_a_segment_has_a_tiny_pipeline():
    assert {r.family for r in by_name.values() if r.segment} == {family for _, family, _ in TINY.values()}


def test_segment_end_to_end_equals_an_independent_reference_capture(case):
    name, pipe = case
    assert not any(m.training for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                   for m in c.modules()), "tiny modules must be in eval mode (T5 dropout)"
    seg = Segmenter(pipe, family=_protocol(name), size=SIZE)
    video = seg.spec.video
    ids, hook, drop = text_ids(seg)
    try:
        res = _segment(seg, _data(video))
    finally:
        hook.remove()
    labels = np.asarray(res.labels)
    frames = (6,) if video else ()
    assert labels.shape == (*frames, 27, 21) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    assert res.scores.shape == ((6, len(CLASSES), 27, 21) if video else (len(CLASSES), 27, 21))
    assert torch.isfinite(res.scores).all()

    # the columns are the class names' tokens of what the text encoder saw, shifted to the transformer's block
    for k, cols_k in enumerate(res.meta["columns"]):
        seq = ids[k][0].tolist()
        for cls, cols in zip(CLASSES, cols_k):
            text = seg.tokenizer.decode([seq[drop + c] for c in cols]).replace(" ", "").replace("▁", "")
            assert text == cls.replace(" ", ""), (name, cls, text)

    # the same run through an independent reference capture: scores = its maps' class-column means, resampled
    seen = []
    ref = Segmenter(pipe, family=_protocol(name), attention_source=reference_source(seen), size=SIZE)
    res2 = _segment(ref, _data(video))
    np.testing.assert_array_equal(np.asarray(res2.labels), labels)
    batch, maps = seen[0]
    n = seg.spec.text_layout(pipe, seg.tokenizer, batch.prompts[0], [], seg.protocol)[1]
    if n is not None:  # the family knows the text block's length: the Segmenter reads the whole block
        assert len(batch.text_index) == maps.shape[-1] == n
    g = torch.stack([maps[0][:, c].mean(-1) for c in res.meta["columns"][0]])  # one prompt holds the classes
    g = g.reshape(len(CLASSES), *batch.grid)
    if video:
        expect = torch.stack([F.interpolate(g[None, :, j], size=(27, 21), mode="bilinear", align_corners=False)[0]
                              for j in res.meta["frame_of"]])  # [F, C, H, W]
        p_t = seg.spec.temporal_patch(pipe)
        assert res.meta["frame_of"] == ([0, 0, 0, 0, 0, 1] if p_t == 2 else [0, 1, 1, 1, 1, 2])
        assert tuple(batch.grid) == ((2, 4, 4) if p_t == 2 else (3, 4, 4))
    else:
        expect = F.interpolate(g[None], size=(27, 21), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(res.scores, expect, rtol=1e-5, atol=1e-6)


def test_the_description_refuses_a_record_it_cannot_run():
    """A ``segment`` with no prompt encoding, or a latent normalisation / schedule / noise the description does not
    know, is refused when the description is made (before any model work), naming the field."""
    import dataclasses

    from seg4diff_fast.segmentation.families import SegFamily

    record = by_name["sd3"]
    for change, match in ((dict(encode=None), "encode"), (dict(latents="nope"), "latents"),
                          (dict(schedule="nope"), "schedule"), (dict(noise="nope"), "noise")):
        bad = dataclasses.replace(record, segment=dataclasses.replace(record.segment, **change))
        with pytest.raises(ValueError, match=match):
            SegFamily(bad)


def test_tiny_pipeline_refuses_what_does_not_apply():
    """An unknown tiny pipeline, or ``vae_blocks`` for a family whose tiny VAE is its own, is refused before any
    model is built."""
    with pytest.raises(ValueError, match="not 'nope'"):
        tiny_pipeline("nope")
    with pytest.raises(ValueError, match="vae_blocks"):
        tiny_pipeline("qwenimage", vae_blocks=1)
