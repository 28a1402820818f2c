"""Every family record (seg4diff_fast/capture/families/) through the same equivalence checks: one table of cases, one
test. Tiny random-weight transformers (configs scaled down from the models' defaults, as diffusers' own tests do;
built by test_capture_families*.py, test_capture_masked.py and tiny_models.py), CPU, float32.

Every case: the captured model's output equals the default processor's, and the maps equal the float64 oracle
(``reference_joint_attention``) applied to the q, k, v, mask and scale that the DEFAULT processor handed to SDPA (a
spy on ``F.scaled_dot_product_attention``; diffusers' native dispatcher backend calls it too), laid out by the case's
own oracle layout (written with explicit per-sample slicing, independent of the records' code) and restricted to the
generated image's rows where reference images, history or pad tokens ride along. For an outer-product mask the
oracle's key mask is its diagonal (checked to be that outer product) and the rows of the masked text queries are 0,
as SDPA answers a query whose keys are all masked. Cases with a mask run a batch whose samples have different text
lengths. Every record has at least one case (:func:`test_every_family_record_has_a_case`); what is special to a
family is tested in the per-family files.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple, Optional, Tuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_capture_families as fam  # noqa: E402
import test_capture_families_more1 as more1  # noqa: E402
import test_capture_families_more2 as more2  # noqa: E402
import test_capture_masked as masked  # noqa: E402
import tiny_models as tm  # noqa: E402
from test_capture import _triton_runs, max_rel  # noqa: E402
from test_capture_masked import oracle_masks, sdpa_spy, text_mask  # noqa: E402

from seg4diff_fast.capture import AttentionStore, register  # noqa: E402
from seg4diff_fast.capture.families import FAMILIES  # noqa: E402
from seg4diff_fast.capture.handle import _adapter_for  # noqa: E402
from seg4diff_fast.reference import reference_joint_attention  # noqa: E402


# ------------------------------------------------------------------------------------------------- oracle layouts
# layout(q, k, v, mask, inputs) -> (q, k, v [B, H, N, D], key_mask [B, N] bool, query_mask [B, N] bool or None,
# t0, t1 (the text block), n_gen (image rows kept) or None (all)); q, k, v, mask: what the default processor gave SDPA
def _masks(mask, b, n):
    return (torch.ones(b, n, dtype=torch.bool), None) if mask is None else oracle_masks(mask, b, n)


def fixed(text_at: str, text_len: Optional[int] = None, n_gen: Optional[int] = None) -> Callable:
    """A text block of ``text_len`` tokens (None: ``encoder_hidden_states.shape[1]``) at ``text_at``, the same in every
    sample; q, k, v as given; the first ``n_gen`` image rows kept."""

    def layout(q, k, v, mask, inputs):
        b, _, n, _ = q.shape
        t = inputs["encoder_hidden_states"].shape[1] if text_len is None else text_len
        t0, t1 = (0, t) if text_at == "start" else (n - t, n)
        return (q, k, v, *_masks(mask, b, n), t0, t1, n_gen)

    return layout


def lumina2(lengths, n_img) -> Callable:
    """Lumina2's sequence is, per sample, ``[c_b text, n_img image, padding]``: the oracle's is
    ``[c_b text, padding, image]`` (one text block ``[0, max c_b)``, its padded columns masked keys)."""

    def layout(q, k, v, mask, inputs):
        b, _, n, _ = q.shape
        keys, _ = _masks(mask, b, n)
        pieces = [(slice(0, c), slice(c + n_img, n), slice(c, c + n_img)) for c in lengths]
        order = torch.stack([torch.cat([torch.arange(n)[s] for s in p]) for p in pieces])  # [B, N]
        take = lambda t: torch.stack([t[i][:, order[i]] for i in range(b)])  # noqa: E731
        return take(q), take(k), take(v), torch.stack([keys[i, order[i]] for i in range(b)]), None, 0, max(lengths), n_img

    return layout


def framepack(text_len, n_gen, n_hist) -> Callable:
    """FramePack's ``[history (n_hist), generated (n_gen), text]``: the oracle's is ``[generated, history, text]``,
    whose first n_gen image rows are the generated frames'."""

    def layout(q, k, v, mask, inputs):
        b, _, n, _ = q.shape
        order = torch.cat([torch.arange(n_hist, n_hist + n_gen), torch.arange(n_hist), torch.arange(n_hist + n_gen, n)])
        assert n == n_hist + n_gen + text_len
        return q[:, :, order], k[:, :, order], v[:, :, order], _masks(mask, b, n)[0][:, order], None, n - text_len, n, n_gen

    return layout


def image_queries(text_at, text_len) -> Callable:
    """Queries of the image only (``[B, H, N_img, D]``), keys of the joint sequence: the oracle's joint sequence
    puts random text queries at the text's place (an image row of the softmax does not depend on them)."""

    def layout(q, k, v, mask, inputs):
        b, h, n_img, d = q.shape
        assert k.shape[2] == n_img + text_len
        text_q = torch.randn(b, h, text_len, d, generator=torch.Generator().manual_seed(3), dtype=q.dtype)
        joint = torch.cat([text_q, q] if text_at == "start" else [q, text_q], dim=2)
        t0, t1 = (0, text_len) if text_at == "start" else (n_img, n_img + text_len)
        return joint, k, v, _masks(mask, b, k.shape[2])[0], None, t0, t1, n_img

    return layout


# ---------------------------------------------------------------------------------------------------- the cases
class Case(NamedTuple):
    family: str  # the record the transformer must resolve to
    build: Callable
    inputs: Callable
    layer: str
    layout: Callable
    grid: Tuple[int, ...]
    masked: bool = False  # the default processor passes SDPA a mask (and the samples' text lengths differ)


def _flux_style(name):
    return lambda: fam.tiny_flux_style(name)


CASES = {
    "sd3": Case("sd3", tm.tiny_sd3_transformer, tm.sd3_inputs, "transformer_blocks.1", fixed("end"), (6, 5)),
    "sd35": Case("sd3", lambda: tm.tiny_sd3_transformer(sd35=True), tm.sd3_inputs, "transformer_blocks.0",
                 fixed("end"), (6, 5)),
    "flux_double": Case("flux", tm.tiny_flux_transformer, tm.flux_inputs, "transformer_blocks.1", fixed("start"),
                        (5, 6)),
    "flux_kontext_double": Case("flux", tm.tiny_flux_transformer, lambda: fam.with_reference(tm.flux_inputs(), 1, 3, 4, 4),
                                "transformer_blocks.1", fixed("start", n_gen=30), (5, 6)),
    "flux_kontext_single": Case("flux", tm.tiny_flux_transformer, lambda: fam.with_reference(tm.flux_inputs(), 1, 3, 4, 4),
                                "single_transformer_blocks.0", fixed("start", n_gen=30), (5, 6)),
    "flux2_reference_double": Case("flux2", tm.tiny_flux2_transformer,
                                   lambda: fam.with_reference(tm.flux2_inputs(), 10, 3, 3, 4), "transformer_blocks.0",
                                   fixed("start", n_gen=20), (4, 5)),
    "flux2_reference_single": Case("flux2", tm.tiny_flux2_transformer,
                                   lambda: fam.with_reference(tm.flux2_inputs(), 10, 3, 3, 4),
                                   "single_transformer_blocks.1", fixed("start", n_gen=20), (4, 5)),
    "cogview4": Case("cogview4", fam.tiny_cogview4, fam.cogview4_inputs, "transformer_blocks.1", fixed("start"), (5, 3)),
    "cogview3plus": Case("cogview3plus", fam.tiny_cogview3plus, lambda: fam.cogview4_inputs(height=6, width=8),
                         "transformer_blocks.1", fixed("start"), (3, 4)),
    "consisid": Case("consisid", fam.tiny_consisid, fam.consisid_inputs, "transformer_blocks.1", fixed("start"),
                     (3, 4, 3)),
    "cogvideox": Case("cogvideox", fam.tiny_cogvideox, fam.cogvideox_inputs, "transformer_blocks.1", fixed("start"),
                      (3, 4, 3)),
    # HiDream's text: [T5 7, Llama 5 (last listed layer), Llama 5 (the block's layer)]
    "hidream_double": Case("hidream", fam.tiny_hidream, fam.hidream_inputs, "double_stream_blocks.0",
                           fixed("end", 17), (5, 5)),
    "hidream_single": Case("hidream", fam.tiny_hidream, fam.hidream_inputs, "single_stream_blocks.0",
                           fixed("end", 17), (5, 5)),
    # non-square: image tokens padded to max_seq = 64, the grid keeps the real 4 x 6 rows
    "hidream_nonsquare": Case("hidream", fam.tiny_hidream, lambda: fam.hidream_inputs(height=8, width=12),
                              "double_stream_blocks.0", fixed("end", 17, 24), (4, 6)),
    "qwenimage": Case("qwenimage", fam.tiny_qwenimage, fam.qwenimage_inputs, "transformer_blocks.1", fixed("start"),
                      (5, 3)),
    "qwenimage_edit": Case("qwenimage", fam.tiny_qwenimage, lambda: fam.qwenimage_inputs(shapes=((5, 3), (3, 4))),
                           "transformer_blocks.0", fixed("start", n_gen=15), (5, 3)),
    "qwenimage_masked": Case("qwenimage", fam.tiny_qwenimage, masked.qwenimage_inputs, "transformer_blocks.1",
                             fixed("start"), (5, 3), True),
    "ovis_image": Case("ovis_image", _flux_style("OvisImageTransformer2DModel"), fam.flux_style_inputs,
                       "single_transformer_blocks.1", fixed("start"), (5, 6)),
    "longcat_image": Case("longcat_image", _flux_style("LongCatImageTransformer2DModel"),
                          lambda: fam.flux_style_inputs(True), "transformer_blocks.0", fixed("start"), (5, 6)),
    "hunyuanimage_double": Case("hunyuanimage", masked.tiny_hunyuanimage, masked.hunyuanimage_inputs,
                                "transformer_blocks.0", fixed("end", 7), (5, 3), True),
    "hunyuanimage_single": Case("hunyuanimage", masked.tiny_hunyuanimage, masked.hunyuanimage_inputs,
                                "single_transformer_blocks.0", fixed("end", 7), (5, 3), True),
    "hunyuanvideo_double": Case("hunyuanvideo", masked.tiny_hunyuanvideo, masked.hunyuanvideo_inputs,
                                "transformer_blocks.0", fixed("end", 7), (3, 4, 5), True),
    "hunyuanvideo_single": Case("hunyuanvideo", masked.tiny_hunyuanvideo, masked.hunyuanvideo_inputs,
                                "single_transformer_blocks.0", fixed("end", 7), (3, 4, 5), True),
    "hunyuanvideo15": Case("hunyuanvideo15", masked.tiny_hunyuanvideo15, masked.hunyuanvideo15_inputs,
                           "transformer_blocks.1", fixed("end", 15), (3, 4, 5), True),
    "chroma_double": Case("chroma", masked.tiny_chroma, masked.chroma_inputs, "transformer_blocks.0", fixed("start", 7),
                          (5, 6), True),
    "chroma_single": Case("chroma", masked.tiny_chroma, masked.chroma_inputs, "single_transformer_blocks.0",
                          fixed("start", 7), (5, 6), True),
    "bria_double": Case("bria", more1.tiny_bria, more1.bria_inputs, "transformer_blocks.0", fixed("start", 7, 30),
                        (5, 6)),
    "bria_single": Case("bria", more1.tiny_bria, more1.bria_inputs, "single_transformer_blocks.0",
                        fixed("start", 7, 30), (5, 6)),
    "bria_fibo_double": Case("bria_fibo", more1.tiny_bria_fibo, more1.bria_fibo_inputs, "transformer_blocks.0",
                             fixed("start", 7, 30), (5, 6), True),
    "bria_fibo_single": Case("bria_fibo", more1.tiny_bria_fibo, more1.bria_fibo_inputs, "single_transformer_blocks.0",
                             fixed("start", 7, 30), (5, 6), True),
    "flux3": Case("flux3", more1.tiny_flux3, more1.flux3_inputs, "single_transformer_blocks.1", fixed("start", 6, 20),
                  (4, 5)),
    "flux3_reference": Case("flux3", more1.tiny_flux3, lambda: more1.flux3_inputs(reference=True),
                            "single_transformer_blocks.0", fixed("start", 6, 20), (4, 5)),
    "krea2": Case("krea2", more1.tiny_krea2, more1.krea2_inputs, "transformer_blocks.1", fixed("start", 7, 15), (5, 3),
                  True),
    "ernie_image": Case("ernie_image", more1.tiny_ernie_image, more1.ernie_image_inputs, "layers.1",
                        fixed("end", 7, 15), (5, 3), True),
    "glm_image": Case("glm_image", more1.tiny_glm_image, more1.glm_image_inputs, "transformer_blocks.1",
                      fixed("start", 7, 15), (5, 3)),
    "joyimage": Case("joyimage", more1.tiny_joyimage, more1.joyimage_inputs, "double_blocks.1", fixed("end", 7, 15),
                     (5, 3)),
    "joyimage_edit": Case("joyimage", more1.tiny_joyimage, lambda: more1.joyimage_inputs(items=2), "double_blocks.0",
                          fixed("end", 7, 15), (5, 3)),
    "joyimage_edit_plus": Case("joyimage_edit_plus", lambda: more1.tiny_joyimage("JoyImageEditPlusTransformer3DModel"),
                               more1.joyimage_edit_plus_inputs, "double_blocks.1", fixed("end", 7, 15), (5, 3), True),
    "z_image": Case("z_image", more1.tiny_z_image, more1.z_image_inputs, "layers.1", fixed("end", 64, 15), (5, 3),
                    True),
    "auraflow_joint": Case("auraflow", more2.tiny_auraflow, more2.auraflow_inputs, "joint_transformer_blocks.0",
                           fixed("start", 8 + 7, 15), (5, 3)),
    "auraflow_single": Case("auraflow", more2.tiny_auraflow, lambda: more2.auraflow_inputs(height=6, width=8),
                            "single_transformer_blocks.0", fixed("start", 8 + 7, 12), (3, 4)),
    "lumina2_padded": Case("lumina2", more2.tiny_lumina2, more2.lumina2_inputs, "layers.1", lumina2((7, 4), 15), (5, 3),
                           True),
    "lumina2_padded_reversed": Case("lumina2", more2.tiny_lumina2, lambda: more2.lumina2_inputs((3, 8)), "layers.0",
                                    lumina2((3, 8), 15), (5, 3), True),
    "lumina2_equal": Case("lumina2", more2.tiny_lumina2, lambda: more2.lumina2_inputs((5, 5)), "layers.0",
                          fixed("start", 5, 15), (5, 3)),
    "easyanimate_mmdit": Case("easyanimate", more2.tiny_easyanimate, more2.easyanimate_inputs, "transformer_blocks.0",
                              fixed("start", 9, 36), (3, 4, 3)),
    "easyanimate_concat": Case("easyanimate", more2.tiny_easyanimate, more2.easyanimate_inputs, "transformer_blocks.1",
                               fixed("start", 9, 36), (3, 4, 3)),
    "motif_video_double": Case("motif_video", more2.tiny_motif_video, more2.motif_video_inputs, "transformer_blocks.0",
                               fixed("end", 7, 60), (3, 4, 5), True),
    "motif_video_single_i2v": Case("motif_video", more2.tiny_motif_video, lambda: more2.motif_video_inputs(image=True),
                                   "single_transformer_blocks.1", fixed("end", 10, 60), (3, 4, 5), True),
    "framepack_double": Case("hunyuanvideo_framepack", more2.tiny_framepack, more2.framepack_inputs,
                             "transformer_blocks.0", framepack(10, 30, 23), (2, 3, 5), True),
    "framepack_single": Case("hunyuanvideo_framepack", more2.tiny_framepack, more2.framepack_inputs,
                             "single_transformer_blocks.0", framepack(10, 30, 23), (2, 3, 5), True),
    # a batch of one: the forward cuts the prompt to its 5 valid tokens, no mask
    "framepack_batch1": Case("hunyuanvideo_framepack", more2.tiny_framepack,
                             lambda: dict(more2.framepack_inputs(batch=1), encoder_attention_mask=text_mask((5,), 7)),
                             "single_transformer_blocks.0", framepack(3 + 5, 30, 23), (2, 3, 5)),
    "prx": Case("prx", more2.tiny_prx, more2.prx_inputs, "blocks.1", image_queries("start", 7), (5, 3), True),
    "nucleusmoe_dense": Case("nucleusmoe_image", more2.tiny_nucleusmoe, more2.nucleusmoe_inputs, "transformer_blocks.0",
                             image_queries("end", 7), (5, 3), True),
    "nucleusmoe_moe": Case("nucleusmoe_image", more2.tiny_nucleusmoe, more2.nucleusmoe_inputs, "transformer_blocks.1",
                           image_queries("end", 7), (5, 3), True),
    # a batch of one: the processor attends to the 5 valid text tokens only
    "mochi": Case("mochi", more2.tiny_mochi, more2.mochi_inputs, "transformer_blocks.0", fixed("end", 5, 36), (3, 4, 3)),
    "mochi_context_pre_only": Case("mochi", more2.tiny_mochi, more2.mochi_inputs, "transformer_blocks.1",
                                   fixed("end", 5, 36), (3, 4, 3)),
}
TRITON_CASES = ("qwenimage_masked", "hunyuanvideo15", "chroma_single", "bria_fibo_single", "flux3_reference",
                "ernie_image", "z_image", "auraflow_single", "lumina2_padded", "easyanimate_concat",
                "motif_video_single_i2v", "framepack_single", "prx", "nucleusmoe_moe", "mochi")


def _attention(block):
    """The attention module of a block, by the names diffusers gives it (independent of the records)."""
    block = getattr(block, "block", block)  # HiDream
    for name in ("attn", "attention", "self_attention", "attn1"):
        if getattr(block, name, None) is not None:
            return getattr(block, name)
    raise AssertionError(f"no attention module in {type(block).__name__}")


def _sample(out):
    """The model output as one tensor (Z-Image returns a list of per-sample tensors)."""
    sample = out[0]
    return torch.stack(sample) if isinstance(sample, (list, tuple)) else sample


def test_every_family_record_has_a_case():
    assert {c.family for c in CASES.values()} == {f.family for f in FAMILIES}


@pytest.mark.parametrize(
    "case,backend",
    [(c, "torch") for c in sorted(CASES)]
    + [pytest.param(c, "triton", marks=pytest.mark.skipif(not _triton_runs(), reason="no CUDA, no TRITON_INTERPRET"))
       for c in TRITON_CASES],
)
def test_output_and_maps_equal_default_and_reference(case, backend):
    c = CASES[case]
    transformer, inputs = c.build(), c.inputs()
    assert _adapter_for(transformer).family == c.family
    attn = _attention(transformer.get_submodule(c.layer))
    with torch.no_grad(), sdpa_spy(attn) as ref:
        out_ref = _sample(transformer(**inputs))
    assert ref["calls"] == 1 and (ref["mask"] is not None) == c.masked
    image_queries_only = ref["qkv"][0].shape[2] != ref["qkv"][1].shape[2]  # PRX, NucleusMoE: no text queries
    kinds = ("i2t",) if image_queries_only else ("i2t", "t2i")
    store = AttentionStore(capture="i2t" if image_queries_only else "both", heads="all", map_dtype=torch.float32,
                           steps="all", batch="all", backend=backend)
    with register(transformer, [c.layer], store=store), torch.no_grad(), sdpa_spy(attn) as got:
        out = _sample(transformer(**inputs))
    assert "qkv" not in got  # the captured layer's attention ran once, in joint_attention
    q, k, v, key_mask, query_mask, t0, t1, n_gen = c.layout(*ref["qkv"], ref["mask"], inputs)
    _, i2t, t2i = reference_joint_attention(q, k, v, t0, t1, capture="both", heads="all", key_mask=key_mask,
                                            scale=ref["scale"])
    if query_mask is not None:
        t2i = t2i * query_mask[:, None, t0:t1, None]  # SDPA's zero rows for queries without a valid key
    expected = {"i2t": i2t[..., :n_gen, :], "t2i": t2i[..., :n_gen]}  # the generated image's rows / columns
    err_layer, err_model = max_rel(got["out"], ref["out"]), max_rel(out, out_ref)
    errors = {kind: (getattr(store, kind)[c.layer][0].double() - expected[kind]).abs().max().item() for kind in kinds}
    valid = key_mask[:, t0:t1].sum(1).tolist()
    print(f"{case} ({backend}): layer output rel. err {err_layer:.1e}, model {err_model:.1e}; max abs err "
          + ", ".join(f"{kind} {e:.1e}" for kind, e in errors.items()) + f"; valid text {valid}")
    assert err_layer <= 1e-5 and err_model <= 1e-5
    assert store.grid[c.layer] == c.grid and store.i2t[c.layer].shape == (1,) + expected["i2t"].shape
    atol = 1e-6 if backend == "torch" else 1e-5
    for kind in kinds:
        torch.testing.assert_close(getattr(store, kind)[c.layer][0].double(), expected[kind], atol=atol, rtol=1e-5)
    masked_columns = ~key_mask[:, t0:t1]  # [B, T]: padded text columns of the maps are 0
    assert (store.i2t[c.layer][0].permute(0, 3, 1, 2)[masked_columns] == 0).all()
    if c.masked:
        assert valid[0] != valid[1] and masked_columns.any(), valid  # the samples' text lengths differ


def test_a_record_with_a_bad_layer_pattern_or_text_position_is_refused():
    import dataclasses

    from seg4diff_fast.capture.families import Layers

    with pytest.raises(ValueError, match="pattern must read"):
        Layers("transformer_blocks.{i}")  # no attention module
    with pytest.raises(ValueError, match="text_at must be"):
        dataclasses.replace(FAMILIES[0], text_at="middle")
