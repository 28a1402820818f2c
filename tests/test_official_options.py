"""The inference options of the paper's official configs, each against a float64 statement of what the official
code computes (cvlab-kaist/Seg4Diff, read by hand; the formulas below are written here, not copied):

- the backbone's attention processor (``JointAttnProcessor2_0`` in its diffusers fork) at an expert layer:
  ``s = q k^T / sqrt(d)`` per head; ``SOFTMAX_I2T_ONLY``: softmax of the image x first-77-text block over its
  77 columns; else ``SOFTMAX``: the joint softmax over all keys; else the raw scores. Then ``MODEL.HEAD`` one head,
  ``KEEP_HEAD`` the heads kept (flattened ``(h t)`` by the OVSS model), ``MAX_HEAD`` the max over heads, else the
  mean. Several layers: each layer's reduced map, then the mean over layers.
- ``NORM_BEFORE_MERGE`` (``seg4diff_model_ovss.py``): every token column min-max normalised over the pixels
  (``- min``, ``/ (max + 1e-6)``), then a class's columns averaged.
- ``TEST.AUG`` (detectron2's ``DatasetMapperTTA`` + the repo's ``SemanticSegmentorWithTTA``): the 640-short-edge
  image resized to each of 400..1200 (max 4000), plain and flipped; each view's 64x64 maps upsampled to the input
  size, the flipped ones flipped back, the mean of the scores.

The tiny SD3 model runs the real forward; the official side reads q and k at the expert layer from the model's own
``F.scaled_dot_product_attention`` call and does the rest in float64 numpy.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg4diff_fast.segmentation import commands
from seg4diff_fast.segmentation.protocol import PROTOCOLS, TTA_MIN_SIZES, ProtocolError, check_protocol
from seg4diff_fast.segmentation.segmenter import Segmenter
from seg4diff_fast.segmentation.tiny import tiny_pipeline


def _softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def official_cache(q, k, n_img, normalize, heads):
    """q, k ``[B, H, N, D]`` float64 numpy of the joint sequence ``[image, text]`` -> the official attn_cache."""
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # [B, H, N, N]
    cols = slice(n_img, n_img + 77)
    if normalize == "text":  # SOFTMAX_I2T_ONLY
        block = _softmax(s[:, :, :n_img, cols])
    elif normalize == "joint":  # SOFTMAX
        block = _softmax(s)[:, :, :n_img, cols]
    else:  # SOFTMAX: False
        block = s[:, :, :n_img, cols]
    if heads == "max":
        return block.max(axis=1)
    if heads == "keep":  # [B, H, n, t] -> [B, n, (h t)]
        B, H, n, t = block.shape
        return np.transpose(block, (0, 2, 1, 3)).reshape(B, n, H * t)
    if isinstance(heads, int):
        return block[:, heads]
    return block.mean(axis=1)


class OfficialSource:
    """An attention source computing the official cache in float64 from the q, k the model's own SDPA sees at the
    expert layer(s): each layer's reduced map, averaged over the layers."""

    def __init__(self, normalize="joint", heads="mean"):
        self.normalize, self.heads = normalize, heads

    def __call__(self, batch):
        tf = batch.transformer
        n_img = batch.grid[0] * batch.grid[1]
        seen, inside = [], []
        real = torch.nn.functional.scaled_dot_product_attention

        def sdpa(q, k, v, *a, **kw):
            if inside:
                q64, k64 = (t.detach().double().numpy() for t in (q, k))
                seen.append(official_cache(q64, k64, n_img, self.normalize, self.heads))
            return real(q, k, v, *a, **kw)

        hooks = []
        for layer in batch.layers:
            attn = tf.transformer_blocks[layer].attn
            hooks.append(attn.register_forward_pre_hook(lambda m, a: inside.append(1)))
            hooks.append(attn.register_forward_hook(lambda m, a, o: inside.clear()))
        torch.nn.functional.scaled_dot_product_attention = sdpa
        try:
            batch.output = batch.run()
        finally:
            torch.nn.functional.scaled_dot_product_attention = real
            for h in hooks:
                h.remove()
        assert len(seen) == len(batch.layers)
        return torch.from_numpy(np.mean(seen, axis=0))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd3")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    return torch.from_numpy(rng.random((3, 80, 112), dtype=np.float32))


@torch.no_grad()
def _i2t(seg, px, prompts, **kw):
    s = seg._with(dict(kw))
    return s._i2t_for_image(px, s.geometry(*px.shape[-2:]), prompts, None, 0)[0].double()


@pytest.mark.parametrize("normalize,heads", [("joint", "mean"), ("text", "mean"), ("logits", "mean"),
                                             ("joint", "max"), ("text", "max"), ("joint", 1), ("logits", 3),
                                             ("joint", "keep"), ("text", "keep")])
def test_maps_equal_the_official_processor(pipe, image, normalize, heads):
    ours = Segmenter(pipe, size=64)
    official = Segmenter(pipe, size=64, attention_source=OfficialSource(normalize, heads))
    prompts = ["cat grass", "sky"]
    mine = _i2t(ours, image, prompts, normalize=normalize, heads=heads)
    theirs = _i2t(official, image, prompts)
    H = pipe.transformer.config.num_attention_heads
    n_img = np.prod(ours.geometry(*image.shape[-2:]).grid)
    assert mine.shape == (2, n_img, 77 * H if heads == "keep" else 77)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    if (normalize, heads) != ("joint", "mean"):  # the option changes the maps
        assert not torch.allclose(mine[..., :77], _i2t(ours, image, prompts), rtol=1e-3, atol=1e-5)


def test_several_layers_reduce_heads_per_layer_then_average(pipe, image):
    ours = Segmenter(pipe, size=64, layers=(1, 2))
    official = Segmenter(pipe, size=64, layers=(1, 2), attention_source=OfficialSource("joint", "max"))
    mine, theirs = _i2t(ours, image, ["cat"], heads="max"), _i2t(official, image, ["cat"])
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def _official_merge(i2t, columns, norm):
    """``i2t`` [N_img, T] float64 numpy of one prompt -> [N_img, C] class maps (seg4diff_model_ovss.py)."""
    x = i2t.copy()
    if norm:
        x -= x.min(axis=0, keepdims=True)
        x /= x.max(axis=0, keepdims=True) + 1e-6
    return np.stack([x[:, c].mean(-1) for c in columns], axis=1)


@pytest.mark.parametrize("normalize", ["joint", "logits"])
def test_norm_before_merge_equals_the_official(pipe, image, normalize):
    classes = ["cat", "grass", "blue sky"]
    seg = Segmenter(pipe, size=128, normalize=normalize)
    res = seg.segment(image, classes, norm_before_merge=True)
    official = Segmenter(pipe, size=128, attention_source=OfficialSource(normalize, "mean"))
    packs = seg.pack_classes(classes)
    assert len(packs) == 1
    i2t = _i2t(official, image, [packs[0].prompt])[0].numpy()
    merged = _official_merge(i2t, packs[0].columns, True)  # [N_img, C]
    grid = torch.from_numpy(merged.T.reshape(len(classes), *seg.geometry(*image.shape[-2:]).grid))[None]
    want = F.interpolate(grid, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(res.scores.double(), want, rtol=1e-4, atol=1e-5)
    assert res.scores.amax() > 0.5  # normalised: each class map reaches about 1 somewhere (before upsampling)
    plain = seg.segment(image, classes).scores
    assert not torch.allclose(plain, res.scores)


@torch.no_grad()
def test_tta_equals_the_official_views(pipe, image):
    """Every view built here by the official recipe (640 short edge, then each TTA size, 8-bit rounding, flip),
    squashed to the working size; each view's class maps upsampled to the input size, flipped back, averaged."""
    classes = ["cat", "grass"]
    seg = Segmenter(pipe, size=64)
    res = seg.segment(image, classes, tta=True, noise_key="img")
    square = seg._with(dict(resize="square"))
    packs = seg.pack_classes(classes)
    H, W = image.shape[-2:]

    def resize_short(x, short, longest):
        h, w = x.shape[-2:]
        scale = short / min(h, w)
        nh, nw = h * scale, w * scale
        if max(nh, nw) > longest:
            nh, nw = nh * longest / max(nh, nw), nw * longest / max(nh, nw)
        y = F.interpolate(x[None], size=(int(nh + 0.5), int(nw + 0.5)), mode="bilinear", align_corners=False,
                          antialias=True)[0]
        return (y.clamp(0, 1) * 255).round() / 255

    base = resize_short(image, 640, 2560)
    total = 0
    for size in TTA_MIN_SIZES:
        for flip in (0, 1):
            view = resize_short(base, size, 4000)
            view = view.flip(-1) if flip else view
            i2t = square._i2t_for_image(view, square.geometry(*view.shape[-2:]), [packs[0].prompt], None,
                                        f"img/tta/{size}/{flip}")[0][0].double()
            maps = torch.stack([i2t[:, c].mean(-1) for c in packs[0].columns])
            maps = maps.reshape(len(classes), *square.geometry(*view.shape[-2:]).grid)
            up = F.interpolate(maps[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            total = total + (up.flip(-1) if flip else up)
    want = total / (2 * len(TTA_MIN_SIZES))
    torch.testing.assert_close(res.scores.double(), want, rtol=1e-4, atol=1e-6)
    assert np.array_equal(res.labels, want.argmax(0).numpy())
    assert res.meta["tta"]["views"] == 18
    assert not torch.allclose(res.scores, seg.segment(image, classes, noise_key="img").scores)


def test_defaults_are_the_official_eval_configs():
    # eval_ovss.yaml / eval_unsup.yaml: SOFTMAX True, KEEP_HEAD False, NORM_BEFORE_MERGE False; config.py:
    # MAX_HEAD False, SOFTMAX_I2T_ONLY False, MODEL.HEAD None; TEST.AUG.ENABLED False (detectron2's default)
    for p in PROTOCOLS.values():
        assert (p.normalize, p.heads, p.norm_before_merge, p.tta) == ("joint", "mean", False, False)


@pytest.mark.parametrize("field,value", [("normalize", "softmax"), ("heads", "min"), ("heads", -1), ("heads", True),
                                         ("heads", 1.0), ("norm_before_merge", 1), ("tta", "yes")])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(ProtocolError) as e:
        check_protocol(PROTOCOLS["sd3"].replace(**{field: value}))
    assert e.value.field == field


def test_refusals_name_their_field(pipe, image):
    with pytest.raises(ProtocolError) as e:  # the official processor asserts it too
        check_protocol(PROTOCOLS["sd3"].replace(heads="max", normalize="logits"))
    assert e.value.field == "heads"
    with pytest.raises(ProtocolError) as e:
        check_protocol(PROTOCOLS["sd3"].replace(tta=True, resize="square"))
    assert e.value.field == "tta"
    with pytest.raises(ProtocolError) as e:  # 4 heads: 0 .. 3, refused before any compute
        Segmenter(pipe, size=128, heads=4)
    assert e.value.field == "heads" and "4 heads" in str(e.value)
    seg = Segmenter(pipe, size=128)
    for call in (lambda: seg.segment_unsupervised(image, tta=True),
                 lambda: Segmenter(pipe, size=128, tta=True).generate("a cat", ["cat"], num_inference_steps=1)):
        with pytest.raises(ProtocolError) as e:
            call()
        assert e.value.field == "tta"
    with pytest.raises(ProtocolError) as e:
        seg.segment_unsupervised(image, norm_before_merge=True)
    assert e.value.field == "norm_before_merge"


def test_unsupervised_keep_heads_makes_every_heads_tokens_candidates(pipe, image):
    # the official Seg4DiffUnsup: [B, l, h, 4096, 77] -> (h t) columns, each a candidate map for the KL merge
    seg = Segmenter(pipe, size=128)
    res = seg.segment_unsupervised(image, heads="keep")
    H = pipe.transformer.config.num_attention_heads
    assert sorted(i for g in res.meta["groups"] for i in g)[-1] == 77 * H - 1


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    commands.register_commands(sub)
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv,want", [
    ([], {}),
    (["--normalize", "text"], {"normalize": "text"}),
    (["--heads", "max"], {"heads": "max"}),
    (["--heads", "keep"], {"heads": "keep"}),
    (["--heads", "2"], {"heads": 2}),
    (["--norm-before-merge"], {"norm_before_merge": True}),
    (["--tta"], {"tta": True}),
])
def test_flags_set_the_fields(argv, want):
    for cmd in (["segment", "x.png", "--classes", "a"], ["eval", "--dataset", "voc20", "--root", "."]):
        args = _parse(cmd + ["--model", "tiny"] + argv)
        o = commands._overrides(args)
        assert {k: o[k] for k in want} == want
        assert not set(o) & {"normalize", "heads", "norm_before_merge", "tta"} - set(want)


SEGMENT = ["segment", "x.png", "--classes", "a"]


@pytest.mark.parametrize("argv,flag", [(SEGMENT + ["--heads", "max", "--normalize", "logits"], "--heads"),
                                       (SEGMENT + ["--tta", "--resize", "square"], "--tta"),
                                       (SEGMENT[:2] + ["--unsupervised", "--tta"], "--tta"),
                                       (SEGMENT[:2] + ["--unsupervised", "--norm-before-merge"], "--norm-before-merge"),
                                       (["eval", "--dataset", "voc20", "--root", ".", "--unsupervised", "--tta"],
                                        "--tta"),
                                       (["generate", "a cat", "--classes", "cat", "--tta"], "--tta")])
def test_flag_refusals_name_the_flag(argv, flag):
    args = _parse(argv + ["--model", "tiny"])
    with pytest.raises(commands.UsageError) as e:
        commands._overrides(args)
    assert str(e.value).startswith(flag)


def test_bad_heads_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        _parse(["segment", "x.png", "--classes", "a", "--heads", "sum"])
    assert "--heads" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--normalize", "text"], ["--heads", "max"], ["--heads", "0"], ["--tta"]])
def test_analyze_refuses_the_options_it_cannot_honour(tmp_path, capsys, flags):
    from seg4diff_fast.cli import main

    rc = main(["analyze", "--model", "tiny", "--prompt", "a cat", "--classes", "cat", "--out", str(tmp_path / "a")]
              + flags)
    assert rc == 2 and flags[0] in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("normalize", ["text", "logits"])
def test_every_backend_captures_the_normalisations_per_head(pipe, backend, normalize):
    """The store's ``normalize`` reaches the kernel of every backend (the Triton one under TRITON_INTERPRET here),
    with the heads kept: the per-head maps equal the official float64 ones."""
    from seg4diff_fast.capture import register
    from seg4diff_fast.segmentation.segmenter import reduce_heads

    def source(batch):
        handle = register(batch.transformer, layers=list(batch.layers), capture="i2t", heads="all",
                          normalize=normalize, text_index=batch.text_index, map_dtype=torch.float32, backend=backend)
        try:
            batch.run()
        finally:
            handle.remove()
        return reduce_heads(handle.store.maps[f"transformer_blocks.{batch.layers[0]}"], "keep")

    px = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(5))
    mine = _i2t(Segmenter(pipe, size=64, attention_source=source), px, ["cat"])
    theirs = _i2t(Segmenter(pipe, size=64, attention_source=OfficialSource(normalize, "keep")), px, ["cat"])
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_analyze_api_refuses_them_too(pipe):
    from seg4diff_fast.analysis import analyze

    for field, value in (("normalize", "logits"), ("heads", 2), ("tta", True)):
        with pytest.raises(ValueError, match=f"^{field}: analyze"):
            analyze(Segmenter(pipe, size=128, **{field: value}), [], progress=False)


def test_combine_minmax_is_norm_after_merge_but_for_its_epsilon():
    """NORM_AFTER_MERGE: merged -= min over pixels; merged /= max + 1e-6. Ours (combine="minmax") divides by the
    range alone: the same maps scaled by (r + 1e-6) / r, as docs/03 says."""
    from seg4diff_fast.segmentation.segmenter import _combine

    rng = np.random.default_rng(0)
    merged = rng.random((3, 50)) * np.array([[1e-3], [1e-2], [0.3]])  # [C, N_img], three ranges
    x = merged - merged.min(axis=1, keepdims=True)
    official = x / (x.max(axis=1, keepdims=True) + 1e-6)
    ours = _combine(torch.from_numpy(merged), "minmax").numpy()
    r = np.ptp(merged, axis=1, keepdims=True)
    np.testing.assert_allclose(ours * r / (r + 1e-6), official, rtol=1e-12)


def test_store_normalize_is_checked_and_saved(tmp_path):
    from seg4diff_fast.capture import AttentionStore

    with pytest.raises(ValueError, match="normalize"):
        AttentionStore(normalize="softmax")
    AttentionStore(normalize="logits").save(str(tmp_path / "s.safetensors"))
    assert AttentionStore.load(str(tmp_path / "s.safetensors")).normalize == "logits"
