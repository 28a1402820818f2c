"""What is special to the families other than SD3 and Flux.1 (whose tests are tests/test_segmentation*.py), on their
tiny random-weight pipelines built offline: Qwen-Image, CogView4, HiDream, Flux.2 [klein] and [dev], CogView3-Plus,
Ovis-Image, LongCat-Image, Chroma, HunyuanImage, Flux.1 Kontext (images), CogVideoX 1.0 and 1.5, HunyuanVideo and
HunyuanVideo 1.5 (video). Segmentation end to end on every family record: tests/test_segmentation_records.py. Video
files: tests/test_video_files.py.

Here: the image and video entry points refuse the other, generate and the unsupervised mode on each image family,
the middle-layer default, frame padding, the records' protocols and tiny pipelines, and each family's own text
layout (template prefixes, glyph tokens, piecewise tokenisation, a processor as tokenizer, Chroma's float mask).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seg4diff_fast.capture.families import by_name
from seg4diff_fast.segmentation.segmenter import Segmenter
from test_segmentation_records import (  # noqa: E402
    CASES, OTHER, SIZE, TINY, _protocol, build_case as _tiny, reference_source, text_ids)

CLASSES = ["cat", "grass", "sky", "traffic light"]

# the cases of tests/test_segmentation_records.py but SD3, SD3.5 and Flux.1 (theirs: tests/test_segmentation*.py)
FAMILIES = [name for name in CASES if name not in ("sd3", "sd3.5", "flux")]
VIDEO = [name for name in FAMILIES if by_name[TINY[OTHER.get(name, name)][1]].video]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, _tiny(request.param)


def _data(family):
    rng = np.random.RandomState(3)
    if family in VIDEO:
        return rng.randint(0, 256, (6, 27, 21, 3), dtype=np.uint8)  # 6 frames: padded to 9 (1 + 4k)
    return rng.randint(0, 256, (27, 21, 3), dtype=np.uint8)


def test_video_and_image_entry_points_refuse_the_other(family):
    from seg4diff_fast.segmentation.protocol import ProtocolError

    name, pipe = family
    seg = Segmenter(pipe, family=_protocol(name), size=SIZE)
    with pytest.raises(ProtocolError, match="family"):
        if name in VIDEO:
            seg.segment(_data("image"), CLASSES)
        else:
            seg.segment_video([_data("image")] * 5, CLASSES)


def test_middle_layer_default_is_ours():
    """Families the paper did not evaluate default to their middle joint block (documented as ours)."""
    from seg4diff_fast.segmentation.protocol import MIDDLE, PROTOCOLS

    ours = [r.family for r in by_name.values() if r.segment and not r.segment.paper]
    assert len(ours) >= 12 and all(PROTOCOLS[fam].layers == (MIDDLE,) for fam in ours)
    pipe = _tiny("cogview4")
    assert Segmenter(pipe, size=32).protocol.layers == (len(pipe.transformer.transformer_blocks) // 2,)
    assert Segmenter(pipe, size=32, layers=0).protocol.layers == (0,)
    pipe = _tiny("hidream")  # its joint blocks are double_stream_blocks (the record's first blocks)
    assert Segmenter(pipe, size=32).protocol.layers == (len(pipe.transformer.double_stream_blocks) // 2,)


def test_an_integer_default_layer_counts_every_kind_of_block(monkeypatch):
    """A family's integer default layer that the (tiny) transformer does not hold falls back to its middle layer; the
    layers it counts are every kind of the record's blocks (Flux.2's double- then single-stream blocks), so a default
    in the single-stream blocks is kept."""
    from seg4diff_fast.segmentation import protocol

    pipe = _tiny("flux2")  # 1 double-stream block, 2 single-stream blocks: layers 0, 1, 2
    monkeypatch.setitem(protocol.PROTOCOLS, "flux2", protocol.PROTOCOLS["flux2"].replace(layers=(2,)))
    assert protocol.protocol_for(pipe).layers == (2,)
    monkeypatch.setitem(protocol.PROTOCOLS, "flux2", protocol.PROTOCOLS["flux2"].replace(layers=(3,)))
    assert protocol.protocol_for(pipe).layers == (1,)


def test_frames_folder(tmp_path):
    from PIL import Image

    from seg4diff_fast.segmentation.images import load_frames

    data = _data("cogvideox")
    for i, f in enumerate(data):
        Image.fromarray(f).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    px = load_frames(str(tmp_path))
    assert px.shape == (6, 3, 27, 21)
    torch.testing.assert_close(px, torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(ValueError, match="differ in size"):
        load_frames([data[0], data[1][:20]])
    with pytest.raises(ValueError, match="no frames"):
        load_frames([])


def test_generate_and_unsupervised(family):
    """generate (2 steps; the class columns are read at every step) and the unsupervised mode on each image
    family: shapes, finite scores, the prompt's classes found in the text block."""
    name, pipe = family
    if name in VIDEO:
        pytest.skip("a video family: no image generation or unsupervised mode")
    seg = Segmenter(pipe, family=_protocol(name), size=SIZE)
    gen = seg.generate("a cat on the grass", ["cat", "grass"], num_inference_steps=2)
    assert gen.labels.shape == (32, 32) and gen.image is not None and torch.isfinite(gen.scores).all()
    assert all(gen.meta["columns"]) and gen.labels.max() < 2
    # the guidance scale the pipeline was given (none recorded where the record's generate takes it away: HunyuanImage's
    # guider sets its own)
    given = "guidance_scale" in seg.spec.generate_call(pipe, dict(guidance_scale=1.0, height=32, width=32))
    assert gen.meta["guidance_scale"] == (seg.protocol.generate_guidance_scale if given else None)
    uns = seg.segment_unsupervised(_data(name))
    assert uns.labels.shape == (27, 21) and 1 <= len(uns.classes) and torch.isfinite(uns.scores).all()


def test_hidream_generate_size_is_its_pipelines():
    from seg4diff_fast.segmentation.protocol import ProtocolError

    seg = Segmenter(_tiny("hidream"), size=32)
    with pytest.raises(ProtocolError, match="height"):
        seg.generate("a cat", ["cat"], height=32, width=64, num_inference_steps=1)


def test_from_pretrained_loads_a_saved_family_pipeline(tmp_path):
    """A family other than SD3 / Flux loads through the pipeline class its model_index.json names."""
    pipe = _tiny("cogview4")
    pipe.save_pretrained(tmp_path / "cv4")
    seg = Segmenter.from_pretrained(str(tmp_path / "cv4"), family="cogview4", device="cpu", size=32,
                                    local_files_only=True)
    assert type(seg.pipe).__name__ == "CogView4Pipeline" and seg.protocol.family == "cogview4"
    a = seg.segment(_data("image"), CLASSES)
    b = Segmenter(pipe, size=32).segment(_data("image"), CLASSES)
    np.testing.assert_array_equal(a.labels, b.labels)
    torch.testing.assert_close(a.scores, b.scores)


def test_chroma_forward_passes_the_pipelines_float_mask():
    """Chroma: our forward hands the transformer what ChromaPipeline does, a FLOAT 0 / 1 mask [B, T + N_img] (1 = the
    prompt's tokens and the first padding token, then every image token), which SDPA adds as a bias: every text
    column keeps a probability (padding too), and a kept column gets e^1 times the weight it would get as padding."""
    pipe = _tiny("chroma")
    masks, seen = [], []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: masks.append(k["attention_mask"].clone()),
                                                      with_kwargs=True)
    try:
        Segmenter(pipe, size=32, attention_source=reference_source(seen)).segment(_data("image"), CLASSES)
    finally:
        hook.remove()
    mask = masks[0]
    batch, maps = seen[0]
    T = maps.shape[-1]
    assert mask.dtype == pipe.transformer.dtype and mask.shape == (len(batch.prompts), T + maps.shape[1])
    assert (mask[:, T:] == 1).all()
    for i, prompt in enumerate(batch.prompts):
        valid = len(pipe.tokenizer(prompt, truncation=True, max_length=T)["input_ids"])
        want = torch.arange(T) <= valid  # the pipeline's rule: the valid tokens and the first padding token
        assert torch.equal(mask[i, :T], want.to(mask.dtype))
        assert (maps[i] > 0).all()


def test_hunyuanimage_columns_follow_the_valid_byt5_tokens():
    """HunyuanImage: a prompt that quotes text has valid ByT5 (glyph) tokens, which the transformer puts FIRST in its
    text block; the family's columns are shifted by their count and hold, in the block the blocks see, the MLLM
    embeddings of the class names' tokens."""
    from seg4diff_fast.capture.families.hunyuan import hunyuanimage_byt5_tokens

    pipe = _tiny("hunyuanimage")
    seg = Segmenter(pipe, size=32)
    prompt = 'a cat on the grass, "HELLO"'
    spans = [(2, 5), (13, 18)]  # "cat", "grass"
    plain, n = seg.spec.text_layout(pipe, pipe.tokenizer, prompt.split(",")[0], spans, seg.protocol)
    cols, n2 = seg.spec.text_layout(pipe, pipe.tokenizer, prompt, spans, seg.protocol)
    shift = hunyuanimage_byt5_tokens(pipe, prompt)
    assert shift > 0 and n == n2 == pipe.tokenizer_max_length + pipe.tokenizer_2_max_length
    assert cols == [[c + shift for c in cc] for cc in plain]
    seen = {}
    h1 = pipe.transformer.context_embedder.register_forward_hook(lambda m, a, o: seen.update(mllm=o))
    h2 = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(block=a[1]))
    try:
        enc = seg.spec.encode_prompts(pipe, [prompt], seg.protocol)
        seg.spec.forward(pipe, torch.randn(1, 4, 8, 8), torch.tensor(500.0), enc, seg.protocol)
    finally:
        h1.remove()
        h2.remove()
    assert seen["block"].shape[1] == n
    for cc in cols:
        for c in cc:
            torch.testing.assert_close(seen["block"][0, c], seen["mllm"][0, c - shift])


def test_new_families_are_told_from_pipeline_and_model_names():
    from seg4diff_fast.segmentation.protocol import family_of

    assert family_of("lodestones/Chroma1-HD") == "chroma" and family_of("ChromaPipeline") == "chroma"
    for name in ("Flux2Pipeline", "black-forest-labs/FLUX.2-dev", "Flux2KleinPipeline",
                 "black-forest-labs/FLUX.2-klein-4B"):
        assert family_of(name) == "flux2", name
    assert family_of("black-forest-labs/FLUX.1-dev") == "flux"
    assert family_of("hunyuanvideo-community/HunyuanImage-2.1-Diffusers") == "hunyuanimage"
    assert family_of("HunyuanVideoPipeline") == family_of("hunyuanvideo-community/HunyuanVideo") == "hunyuanvideo"
    for name in ("HunyuanVideo15Pipeline", "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"):
        assert family_of(name) == "hunyuanvideo15", name
    assert family_of("LongCatImagePipeline") == family_of("meituan-longcat/LongCat-Image") == "longcat_image"
    # SD3's pipeline is SD3 or SD3.5: its record's name_of tells them by the version in the name
    assert family_of("stabilityai/stable-diffusion-3-medium-diffusers") == "sd3"
    assert family_of("StableDiffusion3Pipeline") == "sd3"
    assert family_of("stabilityai/stable-diffusion-3.5-medium") == family_of("my-sd35-finetune") == "sd3.5"
    with pytest.raises(ValueError, match="cannot tell the model family"):
        family_of("some/unknown-model")


def test_protocols_and_pipeline_names_come_from_the_family_records(monkeypatch):
    """PROTOCOLS, the pipeline classes, the model-id names and what the description runs are read from each
    record's ``segment``; a record that claims another's pipeline (one made by ``replace`` that kept its source's
    ``segment``) is refused."""
    import dataclasses

    import seg4diff_fast.capture.families as families
    from seg4diff_fast.capture.families import by_name
    from seg4diff_fast.capture.families.record import Segment
    from seg4diff_fast.segmentation import protocol
    from seg4diff_fast.segmentation.families import SEG_FAMILIES

    for record in families.FAMILIES:
        if record.segment is None:
            assert record.family not in protocol.PROTOCOLS and record.family not in SEG_FAMILIES
            continue
        spec = SEG_FAMILIES[record.family]  # the one description, reading the record
        assert spec.segment is record.segment
        assert (spec.name, spec.video, spec.batch_prompts) == (record.family, record.video, record.segment.batch_prompts)
        assert protocol.PROTOCOLS[record.family].layers == (record.segment.layer,)
        for key in (record.family, *record.segment.variants):
            assert protocol.PROTOCOLS[key].family == record.family
        assert all(protocol.PIPELINE_FAMILIES[p] == record.family for p in record.segment.pipelines)
    assert protocol.PROTOCOLS["sd3.5"].t5_tokens == 256 and protocol.PROTOCOLS["sd3"].t5_tokens == 77
    copy = dataclasses.replace(by_name["flux"], family="flux_copy")
    monkeypatch.setattr(families, "FAMILIES", families.FAMILIES + (copy,))
    with pytest.raises(RuntimeError, match="FluxPipeline"):
        protocol._from_records()
    with pytest.raises(ValueError, match="layer"):
        Segment(pipelines=("P",), layer="last")


def test_tiny_pipelines_come_from_the_family_records(monkeypatch):
    """The tiny pipelines, their ``--model`` names and protocols are the records' ``segment.tiny``; a record whose
    tiny pipeline is not a ``Tiny`` is refused, and so is a ``Tiny`` with a build order that is not one."""
    import dataclasses

    import seg4diff_fast.capture.families as families
    from seg4diff_fast.capture.families import by_name
    from seg4diff_fast.capture.families.record import Tiny
    from seg4diff_fast.segmentation.segmenter import TINY_MODELS, TINY_PIPELINES
    from seg4diff_fast.segmentation.tiny import tiny_models

    models = tiny_models()
    assert {name for r in families.FAMILIES if r.segment for name in r.segment.tiny} == set(models)
    assert models["sd3.5"][:2] == ("sd3.5", "sd3") and models["sd3.5"][2].transformer["qk_norm"] == "rms_norm"
    assert TINY_MODELS["tiny-flux2-dev"] == "flux2" and TINY_PIPELINES["tiny-flux2-dev"] == "flux2-dev"
    assert TINY_MODELS["tiny-ovis-image"] == "ovis_image" and TINY_MODELS["tiny"] == "sd3"
    bad = dataclasses.replace(by_name["chroma"], family="chroma_copy", segment=dataclasses.replace(
        by_name["chroma"].segment, pipelines=(), model_ids=(), tiny={"chroma_copy": ("tiny_nothing", {})}))
    monkeypatch.setattr(families, "FAMILIES", families.FAMILIES + (bad,))
    with pytest.raises(RuntimeError, match="chroma_copy.*not a Tiny"):
        tiny_models()
    with pytest.raises(ValueError, match="order"):
        dataclasses.replace(by_name["sd3"].segment.tiny["sd3"], order=("parts", "vae"))


def test_longcat_columns_follow_the_piecewise_tokenisation_of_quotes():
    """LongCat-Image tokenises a quoted piece of the prompt one character at a time and the rest piece by piece:
    the family's columns, read in the ids the text encoder really gets (after the template prefix), hold each
    class's characters, including a class inside quotes (three one-character tokens, not the whole-word token)
    and one after it (shifted by the per-character tokens)."""
    from seg4diff_fast.capture.families.flux import longcat_prompt_tokens

    pipe = _tiny("longcat_image")
    seg = Segmenter(pipe, size=32)
    prompt = 'a "cat" on the grass'
    spans = [(3, 6), (15, 20)]  # cat (quoted), grass
    cols, n = seg.spec.text_layout(pipe, seg.tokenizer, prompt, spans, seg.protocol)
    assert n == pipe.tokenizer_max_length and len(cols[0]) == 3  # c, a, t
    ids, hook, drop = text_ids(seg)
    try:
        enc = seg.spec.encode_prompts(pipe, [prompt], seg.protocol)
    finally:
        hook.remove()
    assert enc["encoder_hidden_states"].shape[1] == n
    seq = ids[0][0].tolist()
    ours, _ = longcat_prompt_tokens(pipe.tokenizer, prompt)  # the family's re-tokenisation = the pipeline's ids
    assert seq[drop:drop + len(ours)] == ours and seq[drop + len(ours)] == pipe.tokenizer.pad_token_id
    for (s, e), cc in zip(spans, cols):
        assert pipe.tokenizer.decode([seq[drop + c] for c in cc]).strip() == prompt[s:e]
    whole, _ = seg.spec.text_layout(pipe, seg.tokenizer, "a cat on the grass", [(2, 5), (13, 18)], seg.protocol)
    assert len(whole[0]) == 1 and cols[1][0] > whole[1][0]


def test_video_frame_padding_and_token_frames():
    """Input frames -> the padded count (1 + 4j; CogVideoX 1.5: an even latent count) and each frame's token frame,
    checked against the VAE and the transformer's patch embedding on the tiny pipelines."""
    from seg4diff_fast.segmentation.families import family_spec

    spec = family_spec("cogvideox")
    for name, want in (("cogvideox", {1: 1, 2: 5, 5: 5, 6: 9, 9: 9, 10: 13}),
                       ("cogvideox1.5", {1: 5, 2: 5, 5: 5, 6: 13, 9: 13, 13: 13, 14: 21})):
        pipe = _tiny(name)
        assert {n: spec.padded_frames(pipe, n) for n in want} == want, name
        p_t = spec.temporal_patch(pipe)
        x = torch.rand(1, 3, want[6], 16, 16) * 2 - 1
        with torch.no_grad():
            z = spec.latents(pipe, x)  # [1, F', C, h, w]
            tokens = pipe.transformer.patch_embed(torch.zeros(1, 3, 32), z).shape[1] - 3
        frames_t = tokens // (z.shape[-2] * z.shape[-1] // pipe.transformer.config.patch_size ** 2)
        assert z.shape[1] % p_t == 0 and frames_t == z.shape[1] // p_t == spec.frame_of(pipe, want[6] - 1) + 1
        assert [spec.frame_of(pipe, i) for i in range(6)] == ([0, 1, 1, 1, 1, 2] if p_t == 1 else [0, 0, 0, 0, 0, 1])


def test_hunyuanvideo15_columns_follow_the_valid_byt5_tokens():
    """HunyuanVideo 1.5 (text-to-video): the transformer's text block is [valid image condition (none: zero image
    embeddings), valid ByT5 (the quoted glyph text), valid MLLM, padding]; the family's columns are the MLLM
    positions shifted by the valid ByT5 count, and hold, in the block the first block sees, the MLLM embeddings of
    the class names' tokens (plus the MLLM type embedding)."""
    from seg4diff_fast.capture.families.hunyuan import hunyuanvideo15_byt5_tokens

    pipe = _tiny("hunyuanvideo15")
    seg = Segmenter(pipe, size=32)
    prompt = 'a cat on the grass, "HELLO"'
    spans = [(2, 5), (13, 18)]  # "cat", "grass"
    plain, n = seg.spec.text_layout(pipe, pipe.tokenizer, prompt.split(",")[0], spans, seg.protocol)
    cols, n2 = seg.spec.text_layout(pipe, pipe.tokenizer, prompt, spans, seg.protocol)
    shift = hunyuanvideo15_byt5_tokens(pipe, prompt)
    assert shift > 0 and n == n2 == (pipe.vision_num_semantic_tokens + pipe.tokenizer_2_max_length
                                     + pipe.tokenizer_max_length)
    assert cols == [[c + shift for c in cc] for cc in plain]
    tf = pipe.transformer
    seen = {}
    h1 = tf.context_embedder.register_forward_hook(lambda m, a, o: seen.update(mllm=o))
    h2 = tf.transformer_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(block=a[1], mask=a[3]))
    try:
        enc = seg.spec.encode_prompts(pipe, [prompt], seg.protocol)
        seg.spec.forward(pipe, torch.randn(1, 3, 4, 4, 4), torch.tensor(500.0), enc, seg.protocol)
    finally:
        h1.remove()
        h2.remove()
    assert seen["block"].shape[1] == n
    valid = int(enc["encoder_attention_mask"][0].sum()) + shift  # no valid image-condition token (text-to-video)
    assert seen["mask"][0].bool().sum() == valid and seen["mask"][0, :valid].bool().all()
    for cc in cols:
        for c in cc:
            torch.testing.assert_close(seen["block"][0, c], seen["mllm"][0, c - shift] + tf.cond_type_embed.weight[0])


@pytest.mark.parametrize("bos_in_template", [True, False])
def test_flux2_dev_columns_through_a_processor(bos_in_template):
    """Flux.2 [dev] ships a processor (PixtralProcessor) as its tokenizer: the Segmenter reads its tokenizer, and the
    columns follow the processor's rule for special tokens (none added when the rendered template starts with BOS,
    the tokenizer's own otherwise), checked on the ids the text encoder gets from a tokenizer that adds a BOS."""
    from transformers import ProcessorMixin

    from seg4diff_fast.segmentation.tiny import TINY_MISTRAL_TEMPLATE, tiny_bpe_tokenizer

    class TextProcessor(ProcessorMixin):  # a processor of text only (Pixtral's needs torchvision)
        attributes = ["tokenizer"]
        tokenizer_class = "AutoTokenizer"

        def __init__(self, tokenizer, chat_template=None):
            super().__init__(tokenizer, chat_template=chat_template)

    pipe = _tiny("flux2-dev")
    tok = tiny_bpe_tokenizer(specials=("</s>", "<s>", "[IMG]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]",
                                       "[/INST]"), prefix=("<s>",))
    tok.bos_token = "<s>"
    assert len(tok) == len(pipe.tokenizer) and tok("cat")["input_ids"][0] == tok.bos_token_id
    template = TINY_MISTRAL_TEMPLATE if bos_in_template else TINY_MISTRAL_TEMPLATE.replace("{{ bos_token }}", "")
    pipe.tokenizer = TextProcessor(tok, chat_template=template)
    seg = Segmenter(pipe, size=32)
    assert seg.tokenizer is tok
    prompt, spans = "a cat on the grass", [(2, 5), (13, 18)]
    cols, n = seg.spec.text_layout(pipe, seg.tokenizer, prompt, spans, seg.protocol)
    ids, hook, _ = text_ids(seg)
    try:
        seg.spec.encode_prompts(pipe, [prompt], seg.protocol)
    finally:
        hook.remove()
    seq = ids[0][0].tolist()
    assert len(seq) == n and seq[0] == tok.bos_token_id and seq[1] != tok.bos_token_id  # one BOS either way
    for (s, e), cc in zip(spans, cols):
        assert tok.decode([seq[c] for c in cc]).strip() == prompt[s:e]


@pytest.mark.parametrize("family, cls, without, dtype", [
    ("sd3", "StableDiffusion3Pipeline", ("text_encoder_3", "tokenizer_3"), torch.float16),
    ("sd3.5", "StableDiffusion3Pipeline", ("text_encoder_3", "tokenizer_3"), torch.float16),
    ("flux", "FluxPipeline", (), torch.bfloat16), ("qwenimage", "DiffusionPipeline", (), torch.bfloat16)])
def test_load_pipeline_reads_the_record(monkeypatch, family, cls, without, dtype):
    """``load_pipeline`` loads with the record's pipeline class (SD3, Flux.1: the paper's; the others: the one the
    model names), leaves out its ``load_without`` parts (the paper's SD3 has no T5) and uses its GPU dtype; an
    unknown family is refused before anything loads."""
    import diffusers

    from seg4diff_fast.segmentation.segmenter import load_pipeline

    seen = {}

    class Loaded:
        def to(self, device):
            return self

    def fake(name):
        return classmethod(lambda c, model, **kw: seen.update(cls=name, kw=kw) or Loaded())

    for name in ("StableDiffusion3Pipeline", "FluxPipeline", "DiffusionPipeline"):
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", fake(name))
    load_pipeline("some/model", family=family, device="cuda")
    assert seen["cls"] == cls and seen["kw"]["dtype"] == dtype
    assert {k for k, v in seen["kw"].items() if v is None} - {"local_files_only"} == set(without)
    with pytest.raises(ValueError, match="family must be one of"):
        load_pipeline("some/model", family="nope", device="cpu")
