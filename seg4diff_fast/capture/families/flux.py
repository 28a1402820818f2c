"""Flux-style families: Flux.1 (dev / schnell / Kontext), Flux.2, Flux.3, Chroma, Ovis-Image, LongCat-Image, Bria 3.x,
Bria FIBO. Captured at their processor's ``dispatch_attention_fn`` call (:mod:`seg4diff_fast.capture.dispatch`).

- Flux.1: ``FluxTransformer2DModel`` with ``FluxAttnProcessor``. Joint sequence ``[text, image]`` (q, k, v after
  QK-norm and RoPE on the joint sequence). Layers: ``transformer_blocks.{i}`` (double-stream, text comes as
  ``encoder_hidden_states``) and ``single_transformer_blocks.{j}`` (single-stream: the block concatenates
  ``[text, image]`` before the processor, which is never told the text length). Integer layers follow Seg4Diff:
  double-stream blocks ``0 .. D-1``, then single-stream block ``j`` is ``D + j`` (``D = 19`` for Flux.1-dev).
  Text length: the forward pre-hook reads ``encoder_hidden_states.shape[1]`` (checked against ``txt_ids``). Grid:
  from ``img_ids`` (row, column of each packed 2x2 patch): the ids cross the ``record_maps`` op and the store
  computes the grid when read. Kontext appends the reference image's tokens after the generated image's
  (``img_ids`` column 0 = 1 for them): the grid is the generated image's, and the store keeps only its rows.
- Flux.2: ``Flux2Transformer2DModel``. Double-stream blocks ``Flux2AttnProcessor`` (as Flux.1); single-stream blocks
  ``Flux2ParallelSelfAttnProcessor`` (one projection gives q, k, v and the MLP input; the transformer concatenates
  ``[text, image]`` once before all of them). ``img_ids`` columns ``(t, h, w, l)``; reference images come after the
  generated image with another ``t``: the store keeps the generated image's rows. The KV-cache processors
  (``Flux2KV*``) are refused, and so is a forward with ``kv_cache_mode="extract"`` and reference tokens.
- Flux.3: ``Flux3Transformer2DModel``: per-mode blocks first (``txt_mode_blocks``, ``mode_blocks.image``,
  ``mode_blocks.image_cond``: each attends within its own tokens, no text-image attention: refused), then
  ``single_transformer_blocks.{j}`` over ``[text, image, reference images]`` (``Flux3AttnProcessor``, no mask).
- Chroma (``ChromaTransformer2DModel``, Flux's ``FluxAttnProcessor``). Its blocks turn ``attention_mask`` ``[B, N]``
  into ``m_i * m_j`` ``[B, 1, N, N]``: a boolean mask is captured as HunyuanVideo 1.5's; the ChromaPipeline passes a
  float 0 / 1 mask, which SDPA adds to the scores as a bias: reproduced exactly (key bias ``m`` for the image and
  kept text queries, no bias for the padding text queries, whose t2i rows are refused; ``dispatch._key_mask``).
- Ovis-Image and LongCat-Image: Flux-style transformers in modules of their own (``OvisImageAttnProcessor``,
  ``LongCatImageAttnProcessor``). Their forwards take no attention mask (the pipelines zero padded text embeddings).
- Bria 3.x (``BriaTransformer2DModel``): ``BriaAttnProcessor`` in both kinds of block, no mask. Bria FIBO
  (``BriaFiboTransformer2DModel``): the text block of every block is ``encoder_hidden_states.shape[1]`` tokens (the
  per-block ``text_encoder_layers`` are concatenated along the channels); double-stream blocks run
  ``BriaFiboAttnProcessor``, single-stream ones ``BriaAttnProcessor``; BriaFiboPipeline passes a boolean key mask
  ``[B, 1, 1, N]`` (``joint_attention_kwargs``) when prompts are padded: captured.
"""
from __future__ import annotations

from dataclasses import replace

from .record import Family, Layers, MIDDLE, Segment

__all__ = ["FLUX", "FLUX2", "FLUX3", "CHROMA", "OVIS_IMAGE", "LONGCAT_IMAGE", "BRIA", "BRIA_FIBO", "FAMILIES"]

_T = "diffusers.models.transformers."
_SEG = "seg4diff_fast.segmentation.families."  # the Seg4Diff descriptions (segment.description)


def read_flux(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, N_img, C] packed latent
    encoder_hidden_states = bound.get("encoder_hidden_states")
    txt_ids, img_ids = bound.get("txt_ids"), bound.get("img_ids")
    text_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    if text_len is not None and txt_ids is not None and txt_ids.shape[-2] != text_len:
        raise ValueError(f"txt_ids has {txt_ids.shape[-2]} positions but encoder_hidden_states {text_len} tokens")
    return text_len, img_ids, hidden_states.shape[0]  # the store computes the grid from img_ids when read


def _read_flux2(transformer, bound: dict):
    """As Flux.1's; a forward with ``kv_cache_mode="extract"`` and reference tokens is refused: its image part is
    ``[references, generated image]`` (the references first, unlike Flux2Pipeline's ``[generated, references]``),
    so the image rows and the grid the store reads would be the references'."""
    if bound.get("kv_cache_mode") == "extract" and bound.get("num_ref_tokens"):
        raise ValueError(
            f"capture on {type(transformer).__name__}: kv_cache_mode='extract' puts {bound['num_ref_tokens']} "
            "reference-image tokens before the generated image ([text, references, image]), so the image rows "
            "capture reads would not be the generated image's; capture forwards without the KV cache "
            "(kv_cache_mode=None, the reference tokens after the image as Flux2Pipeline puts them) or with "
            "kv_cache_mode='cached' only"
        )
    return read_flux(transformer, bound)


def _flux3_mode_blocks(transformer):
    why = "a per-mode block of Flux.3: its attention sees one token mode only (no text-image attention)"
    names = [f"txt_mode_blocks.{i}" for i in range(len(transformer.txt_mode_blocks))]
    names += [f"mode_blocks.{m}.{i}" for m, blocks in transformer.mode_blocks.items() for i in range(len(blocks))]
    return {name: why for name in names}


FLUX_LAYERS = (Layers("transformer_blocks.{i}.attn"), Layers("single_transformer_blocks.{i}.attn", "single"))

FLUX = Family(
    family="flux", title="Flux.1 (and Kontext)", transformers=("diffusers.FluxTransformer2DModel",),
    processors=(_T + "transformer_flux.FluxAttnProcessor",), blocks=FLUX_LAYERS, text_at="start",
    cfg_batched=False,  # FluxPipeline's true CFG is a second forward inside cache_context("uncond")
    read=read_flux, grid_text="from `img_ids`",
    # the paper's (segmentation/protocol.py): double block 12, T5 77 tokens, guidance 3.5, its 50-step schedule
    # shifted for 16 tokens, pixels in [0, 1]
    segment=Segment(pipelines=("FluxPipeline", "FluxKontextPipeline"), layer=12, paper=True, model_ids=("flux",),
                    settings=dict(tokenizer="tokenizer_2", guidance=3.5, drop_t5=False, generate_guidance_scale=3.5,
                                  num_inference_steps=50, shift_seq_len=16, vae_pixels="unit"),
                    models="Flux.1-dev, Flux.1 Kontext", description=_SEG + "FluxFamily",
                    tiny={"flux": ("tiny_flux_pipeline", {})}),
)
FLUX2 = replace(
    FLUX, family="flux2", title="Flux.2", transformers=("diffusers.Flux2Transformer2DModel",),
    processors=(_T + "transformer_flux2.Flux2AttnProcessor",),
    single_processors=(_T + "transformer_flux2.Flux2ParallelSelfAttnProcessor",),
    read=_read_flux2,  # Flux2Pipeline: guidance-distilled, one conditional forward per step
    segment=Segment(pipelines=("Flux2KleinPipeline", "Flux2Pipeline"), layer=MIDDLE, model_ids=("flux.2", "flux2"),
                    settings=dict(drop_t5=False, t5_tokens=512, generate_guidance_scale=4.0),
                    models="Flux.2 [klein] / [dev]", description=_SEG + "Flux2KleinFamily",
                    tiny={"flux2": ("tiny_flux2_klein_pipeline", {}), "flux2-dev": ("tiny_flux2_dev_pipeline", {})}),
)
FLUX3 = replace(
    FLUX, family="flux3", title="Flux.3", transformers=("diffusers.Flux3Transformer2DModel",),
    processors=(_T + "transformer_flux3.Flux3AttnProcessor",),
    blocks=(Layers("single_transformer_blocks.{i}.attn", "single"),),
    refused=_flux3_mode_blocks, text="per-mode blocks refused",  # no pipeline in diffusers 0.42
    segment=None,
)
CHROMA = replace(  # ChromaPipeline: the unconditional forward inside cache_context("uncond")
    FLUX, family="chroma", title="Chroma", transformers=("diffusers.ChromaTransformer2DModel",),
    text="`attention_mask`: bool, or the pipeline's float 0 / 1",
    segment=Segment(pipelines=("ChromaPipeline",), layer=MIDDLE, model_ids=("chroma",),
                    settings=dict(drop_t5=False, t5_tokens=512, generate_guidance_scale=5.0),
                    description=_SEG + "ChromaFamily",
                    tiny={"chroma": ("tiny_chroma_pipeline", {})}),
)
OVIS_IMAGE = replace(  # OvisImagePipeline: conditional and unconditional forwards one after the other
    FLUX, family="ovis_image", title="Ovis-Image", transformers=("diffusers.OvisImageTransformer2DModel",),
    processors=(_T + "transformer_ovis_image.OvisImageAttnProcessor",),
    segment=Segment(pipelines=("OvisImagePipeline",), layer=MIDDLE, model_ids=("ovis-image",),
                    settings=dict(drop_t5=False, t5_tokens=256, generate_guidance_scale=5.0),
                    description=_SEG + "OvisImageFamily",
                    tiny={"ovis_image": ("tiny_ovis_image_pipeline", {})}),
)
LONGCAT_IMAGE = replace(
    FLUX, family="longcat_image", title="LongCat-Image", transformers=("diffusers.LongCatImageTransformer2DModel",),
    processors=(_T + "transformer_longcat_image.LongCatImageAttnProcessor",),
    segment=Segment(pipelines=("LongCatImagePipeline",), layer=MIDDLE, model_ids=("longcat-image",),
                    settings=dict(num_inference_steps=50, drop_t5=False, generate_guidance_scale=4.5),
                    description=_SEG + "LongCatImageFamily",
                    tiny={"longcat_image": ("tiny_longcat_image_pipeline", {})}),
)
BRIA = replace(
    FLUX, family="bria", title="Bria 3.x", transformers=("diffusers.BriaTransformer2DModel",),
    processors=(_T + "transformer_bria.BriaAttnProcessor",),
    cfg_batched=True,  # BriaPipeline batches [uncond, cond] in one forward
    segment=None,
)
BRIA_FIBO = replace(
    FLUX, family="bria_fibo", title="Bria FIBO", transformers=("diffusers.BriaFiboTransformer2DModel",),
    processors=(_T + "transformer_bria_fibo.BriaFiboAttnProcessor",),
    single_processors=(_T + "transformer_bria.BriaAttnProcessor",),
    # BriaFiboPipeline batches [uncond, cond] but has no do_classifier_free_guidance: batch="cond" keeps every row
    cfg_batched=True, text="the pipeline's boolean key mask", segment=None,
)
FAMILIES = (FLUX, FLUX2, FLUX3, CHROMA, OVIS_IMAGE, LONGCAT_IMAGE, BRIA, BRIA_FIBO)
