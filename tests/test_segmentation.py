"""Segmentation core: class names -> columns, geometry, and the planted chain prompt -> columns -> grid -> argmax.

The planted test replaces only the attention source (the seam of :class:`Segmenter`): it reads the prompt the
segmenter built, tokenises it on its own, gives every text token a key vector (random, per token id) and every
image token of a known region a query aligned with the tokens of that region's class, and runs the project's
``joint_attention`` (torch backend) on the joint sequence in the family's order: ``[image, text]`` (SD3, with
77 zero T5 tokens after the 77 CLIP ones) or ``[text, image]`` (Flux, T5 tokens). Everything after that is the
real code: VAE of the tiny pipeline, geometry, column means, upsampling, argmax at the input size.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg4diff_fast.segmentation.images import load_image, plan_geometry
from seg4diff_fast.segmentation.segmenter import Segmenter, merge_maps
from seg4diff_fast.segmentation.tiny import tiny_clip_tokenizer, tiny_pipeline, tiny_t5_tokenizer
from seg4diff_fast.segmentation.tokens import check_class_names, pack_prompts, prompt_columns
from seg4diff_fast.segmentation.datasets import ADE150_CLASSES


# ---------------------------------------------------------------- tokens
@pytest.fixture(scope="module")
def clip_tok():
    return tiny_clip_tokenizer()


@pytest.fixture(scope="module")
def t5_tok():
    return tiny_t5_tokenizer()


def _decode_cols(tok, prompt_cols, k, max_length=77):
    ids = tok(prompt_cols.prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    return tok.decode([ids[j] for j in prompt_cols.columns[k]]).replace(" ", "")


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_columns_multi_token_punctuation_repeats(which, clip_tok, t5_tok):
    tok = clip_tok if which == "clip" else t5_tok
    names = ["cat", "giraffe", "traffic light", "cat food", "t-shirt", "person's bag"]
    pc = prompt_columns(tok, names, 77)
    for k, n in enumerate(names):
        assert _decode_cols(tok, pc, k) == n.replace(" ", "").lower()
    # repeated word: the second "cat" is the first column of "cat food", not class 0's column
    assert pc.columns[3][0] > pc.columns[2][-1] > pc.columns[0][0]
    flat = [c for cols in pc.columns for c in cols]
    assert len(flat) == len(set(flat)), "a token given to two classes"
    if which == "clip":
        assert pc.columns[0] == [1]  # position 0 is BOS
    else:
        assert pc.columns[0] == [0]  # T5 has no BOS


def test_pack_prompts_150_classes(clip_tok):
    packs = pack_prompts(clip_tok, ADE150_CLASSES, 77)
    assert len(packs) > 1
    got = [n for p in packs for n in p.classes]
    assert got == ADE150_CLASSES  # each class once, order kept
    for p in packs:
        assert all(0 < c < 76 for cols in p.columns for c in cols)  # never BOS, never the last (EOS) slot
        for k, n in enumerate(p.classes):
            assert _decode_cols(clip_tok, p, k) == n.replace(" ", "")
    assert all(len(p.classes) <= 3 for p in pack_prompts(clip_tok, ADE150_CLASSES, 77, max_classes=3))


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_a_prompt_that_fills_the_window_is_one_prompt(which, clip_tok, t5_tok):
    # the paper's 77-token window holds BOS + 75 + EOS (CLIP), 76 + EOS (T5): a prompt of 75 (76) tokens is one
    # prompt, one token more is two
    tok, fits = (clip_tok, 75) if which == "clip" else (t5_tok, 76)
    words = ["cat", "dog", "grass", "sky", "tree", "road", "car", "food", "water", "wall", "house"]  # one token each
    pairs = [f"{a} {b}" for a in words for b in words if a != b]  # distinct names of two tokens each

    def names_of(n_tokens):
        return pairs[: n_tokens // 2] + (["light"] if n_tokens % 2 else [])

    exact = names_of(fits)
    ids = tok(" ".join(exact), padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1  # it fills the window, EOS last
    assert len(ids) == 77 and len(tok(" ".join(exact))["input_ids"]) == 77
    packs = pack_prompts(tok, exact, 77)
    assert len(packs) == 1 and packs[0].classes == exact
    assert max(c for cols in packs[0].columns for c in cols) == 75  # the last name token, before EOS
    for k in (0, len(exact) - 1):
        assert _decode_cols(tok, packs[0], k) == exact[k].replace(" ", "")
    longer = names_of(fits + 1)
    assert [len(p.classes) for p in pack_prompts(tok, longer, 77, balance=False)] == [len(longer) - 1, 1]


def test_class_name_errors():
    with pytest.raises(ValueError, match="empty"):
        check_class_names([])
    with pytest.raises(ValueError, match="empty names"):
        check_class_names(["cat", " "])
    with pytest.raises(ValueError, match="duplicate"):
        check_class_names(["Cat", "cat"])
    with pytest.raises(TypeError, match="list of class names"):
        check_class_names("cat,dog")
    for bad in (None, 3, b"dog"):  # not made the class 'None', '3' or "b'dog'" (hostile round, issue 19)
        with pytest.raises(TypeError, match=r"classes: class names must be strings, got .* at position 1"):
            check_class_names(["cat", bad])
    assert check_class_names((n for n in [" cat", "dog "])) == ["cat", "dog"]  # any iterable of strings


# ---------------------------------------------------------------- geometry and images
def test_geometry():
    g = plan_geometry(48, 80, 16, 1024, "square")
    assert g.working == g.content == (1024, 1024) and g.grid == (64, 64)
    g = plan_geometry(480, 640, 16, 1024, "aspect")
    assert g.working[0] % 16 == 0 and g.working[1] % 16 == 0 and abs(g.working[1] / g.working[0] - 4 / 3) < 0.05
    g = plan_geometry(480, 640, 16, 1000, "pad")
    assert g.content == (750, 1000) and g.working == (752, 1008)
    assert plan_geometry(50, 70, 16, None, "pad").working == (64, 80)
    with pytest.raises(ValueError, match="smaller than one image token"):
        plan_geometry(8, 100, 16, 1024, "square")
    with pytest.raises(ValueError, match="positional limit"):
        plan_geometry(100, 100, 16, 4096, "square", max_side=3072)


def test_load_image_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(str(bad))
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(torch.full((3, 4, 4), 3.0))
    assert load_image(np.zeros((5, 7), np.uint8)).shape == (3, 5, 7)
    assert load_image(torch.zeros(5, 7, 3)).shape == (3, 5, 7)


# ---------------------------------------------------------------- planted chain
def region_of(y: float, x: float) -> str:
    """Ground truth in normalised image coordinates: asymmetric, so a transposed or flipped grid fails."""
    if x >= 0.6:
        return "giraffe"
    if y < 0.5 and x < 0.3:
        return "cat"
    return "sky"


CLASSES = ["cat", "giraffe", "sky"]


def planted_source(tokenizer, family, geom_of, dim=64, beta=8.0):
    gen = torch.Generator().manual_seed(0)
    E = F.normalize(torch.randn(len(tokenizer), dim, generator=gen), dim=-1)
    calls = []

    def source(batch):
        geom = geom_of()
        gh, gw = batch.grid
        assert (gh, gw) == geom.grid
        qs, ks = [], []
        for prompt in batch.prompts:
            ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
            k_txt = E[ids] * 1.0  # [77, d]
            if family == "sd3":
                k_txt = torch.cat([k_txt, torch.zeros(77, dim)])  # the 77 zero T5 tokens of the paper's SD3
            q_img = torch.zeros(gh * gw, dim)
            for r in range(gh):
                for c in range(gw):
                    y = (r + 0.5) * geom.patch / geom.content[0]
                    x = (c + 0.5) * geom.patch / geom.content[1]
                    name_ids = tokenizer(region_of(y, x), add_special_tokens=False)["input_ids"]
                    q_img[r * gw + c] = beta * E[name_ids].sum(0)
            k_img = 0.1 * torch.randn(gh * gw, dim, generator=gen)
            q_txt = torch.randn(k_txt.shape[0], dim, generator=gen)
            if family == "sd3":
                qs.append(torch.cat([q_img, q_txt]))
                ks.append(torch.cat([k_img, k_txt]))
            else:
                qs.append(torch.cat([q_txt, q_img]))
                ks.append(torch.cat([k_txt, k_img]))
        q = torch.stack(qs)[:, None]  # [B, 1, N, d]
        k = torch.stack(ks)[:, None]
        v = torch.randn_like(q)
        n_txt = 154 if family == "sd3" else 77
        n = q.shape[2]
        text = (n - n_txt, n) if family == "sd3" else (0, n_txt)
        from seg4diff_fast.attention import joint_attention

        _, maps = joint_attention(q, k, v, text, capture="i2t", heads="mean", text_index=batch.text_index,
                                  map_dtype=torch.float32, scale=1.0, backend="torch")
        calls.append(list(batch.prompts))
        return maps.i2t  # [B, N_img, 77]

    source.calls = calls
    return source


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": tiny_pipeline("sd3"), "flux": tiny_pipeline("flux")}


def _expected(H, W):
    lab = np.zeros((H, W), np.int64)
    for i in range(H):
        for j in range(W):
            lab[i, j] = CLASSES.index(region_of((i + 0.5) / H, (j + 0.5) / W))
    return lab


def _iou(pred, gt, k):
    return ((pred == k) & (gt == k)).sum() / max(((pred == k) | (gt == k)).sum(), 1)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("size,resize,per_prompt", [(None, "square", None), (64, "square", None),
                                                     (64, "pad", None), (None, "aspect", 1)])
def test_planted_mask_recovered(pipes, family, size, resize, per_prompt):
    H, W = 48, 80  # non-square
    pipe = pipes[family]
    tok = pipe.tokenizer if family == "sd3" else pipe.tokenizer_2
    seg = None
    src = planted_source(tok, family, lambda: seg.geometry(H, W))
    seg = Segmenter(pipe, family=family, attention_source=src, size=size, resize=resize,
                    max_classes_per_prompt=per_prompt)
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(1))
    res = seg.segment(image, CLASSES)
    assert res.labels.shape == (H, W) and res.scores.shape == (3, H, W)
    if per_prompt == 1:
        assert len(src.calls) == 1 and len(src.calls[0]) == 3  # three prompts, one batch
    gt = _expected(H, W)
    acc = (res.labels == gt).mean()
    ious = [_iou(res.labels, gt, k) for k in range(3)]
    assert acc > 0.93 and min(ious) > 0.85, (acc, ious)


def test_batch_of_images_and_overrides(pipes):
    H, W = 48, 80
    seg = None
    src = planted_source(pipes["sd3"].tokenizer, "sd3", lambda: seg.geometry(H, W))
    seg = Segmenter(pipes["sd3"], attention_source=src, size=None)
    img = torch.rand(3, H, W)
    res = seg.segment([img, img.numpy().transpose(1, 2, 0)], CLASSES)
    assert isinstance(res.labels, list) and len(res.labels) == 2
    assert (res[0].labels == res[1].labels).all()
    r2 = seg.segment(img, CLASSES, timestep_index=-3, seed=5)
    assert r2.meta["timestep_index"] == -3 and r2.meta["seed"] == 5
    assert seg.protocol.timestep_index == -8  # the override did not stick


def test_bad_input_fails_before_model_work(pipes, tmp_path):
    def never(batch):
        raise AssertionError("model work started")

    seg = Segmenter(pipes["sd3"], attention_source=never, size=None)
    with pytest.raises(ValueError, match="empty"):
        seg.segment(torch.rand(3, 32, 32), [])
    with pytest.raises(ValueError, match="duplicate"):
        seg.segment(torch.rand(3, 32, 32), ["cat", "cat"])
    with pytest.raises(ValueError, match="smaller than one image token"):
        seg.segment(torch.rand(3, 2, 32), ["cat"])
    bad = tmp_path / "x.jpg"
    bad.write_text("nope")
    with pytest.raises(ValueError, match="cannot read"):
        seg.segment(str(bad), ["cat"])
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        seg.generate("a dog on the grass", ["cat"])


def test_merge_maps():
    a = torch.zeros(8, 8)
    a[:4] = 1.0
    b = torch.zeros(8, 8)
    b[:, 4:] = 1.0
    maps = torch.stack([a, a * 0.999, b, b])
    merged, groups = merge_maps(maps * 10, kl_threshold=0.1)
    assert groups == [[0, 1], [2, 3]] and merged.shape == (2, 8, 8)


@pytest.mark.parametrize("family,layer", [("sd3", 1), ("flux", "transformer_blocks.0"),
                                          ("flux", "single_transformer_blocks.0")])
def test_segment_stops_after_the_expert_layer(pipes, family, layer):
    """segment() stops the forward after the last expert layer: the later blocks never run, and the scores
    equal those of the whole forward exactly."""
    import dataclasses

    from seg4diff_fast.segmentation.segmenter import capture_attention_source

    tf = pipes[family].transformer
    blocks = list(tf.transformer_blocks) + list(getattr(tf, "single_transformer_blocks", []))
    names = [f"transformer_blocks.{i}" for i in range(len(tf.transformer_blocks))]
    names += [f"single_transformer_blocks.{i}" for i in range(len(getattr(tf, "single_transformer_blocks", [])))]
    last = names.index(layer if isinstance(layer, str) else f"transformer_blocks.{layer}")
    assert last < len(blocks) - 1  # there are blocks after the expert layer to skip
    calls = [0] * len(blocks)
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)]
    try:
        img = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(0))
        fast = Segmenter(pipes[family], family=family, size=None, layers=(layer,)).segment(img, ["cat", "sky"])
        ran = list(calls)
        whole = Segmenter(pipes[family], family=family, size=None, layers=(layer,),
                          attention_source=lambda b: capture_attention_source(dataclasses.replace(b, stop_after_layers=False)))
        full = whole.segment(img, ["cat", "sky"])
    finally:
        for h in hooks:
            h.remove()
    assert ran[:last + 1] == [1] * (last + 1) and ran[last + 1:] == [0] * (len(blocks) - last - 1), ran
    assert calls[last + 1:] == [1] * (len(blocks) - last - 1)  # the whole forward did run them
    torch.testing.assert_close(torch.as_tensor(fast.scores), torch.as_tensor(full.scores), rtol=0, atol=0)
    assert (fast.labels == full.labels).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_forward_runs(pipes, family):
    """The forward of each family through the real tiny transformer (the source calls batch.run())."""
    seen = {}

    def source(batch):
        out = batch.run()
        seen["shape"] = tuple(out[0].shape)
        n = batch.grid[0] * batch.grid[1]
        return torch.softmax(torch.randn(len(batch.prompts), n, len(batch.text_index)), -1)

    assert not any(m.training for c in pipes[family].components.values() if isinstance(c, torch.nn.Module)
                   for m in c.modules()), "tiny modules must be in eval mode (T5 dropout)"
    seg = Segmenter(pipes[family], family=family, attention_source=source, size=None)
    res = seg.segment(torch.rand(3, 24, 40), ["cat", "sky"])
    assert res.labels.shape == (24, 40)
    assert seen["shape"] == ((1, 4, 12, 20) if family == "sd3" else (1, 60, 4))
    u = seg.segment_unsupervised(torch.rand(3, 24, 40))
    assert u.labels.shape == (24, 40) and len(u.classes) >= 1


def test_full_class_list_150(pipes, clip_tok):
    """The 150 ADE20K names: split over balanced prompts, run in batches, one score map per class."""
    batches = []

    def source(batch):
        batches.append(len(batch.prompts))
        n = batch.grid[0] * batch.grid[1]
        return torch.softmax(torch.randn(len(batch.prompts), n, len(batch.text_index)), -1)

    seg = Segmenter(pipes["sd3"], attention_source=source, size=None, prompt_batch=4)
    res = seg.segment(torch.rand(3, 24, 40), ADE150_CLASSES)
    packs = pack_prompts(clip_tok, ADE150_CLASSES, 77)
    sizes = [len(p.classes) for p in packs]
    greedy = [len(p.classes) for p in pack_prompts(clip_tok, ADE150_CLASSES, 77, balance=False)]
    assert greedy[-1] < 8 and len(sizes) == len(greedy) == 12  # filling prompts in order leaves a short last one
    assert max(sizes) < max(greedy) and min(sizes) >= 10  # balanced over as many prompts: no short last prompt
    assert res.meta["prompts"] == [p.prompt for p in packs]
    assert sum(batches) == len(packs) and max(batches) <= 4
    assert res.scores.shape == (150, 24, 40) and res.labels.max() < 150
