"""Families captured through :mod:`seg4diff_fast.capture.dispatch` that need no code of their own beyond where
the text sits, its length and the image grid: CogView4, CogView3-Plus, HiDream, Qwen-Image, HunyuanImage,
Chroma, Ovis-Image and LongCat-Image (image), CogVideoX, ConsisID, HunyuanVideo and HunyuanVideo 1.5 (video);
at the end of the file (their docstrings say the rest): AuraFlow, Lumina2 (per-sample text lengths: its tokens
reordered, :class:`_ReorderingSite`), PRX and NucleusMoE-Image (image queries only, :class:`_ImageQueriesAdapter`)
(image), EasyAnimate, Motif-Video, HunyuanVideo FramePack (the generated frames' grid) and Mochi (a batch of
one) (video).

- CogView4: ``CogView4Transformer2DModel``, ``transformer_blocks.{i}.attn1`` with ``CogView4AttnProcessor``
  (``F.scaled_dot_product_attention``), joint sequence ``[text, image]``, RoPE on the image part only. Its
  pipeline passes no attention mask; a forward given ``attention_mask`` (the processor turns it into a float 0 / 1
  outer product that SDPA adds to the scores: a bias, not a key mask) is reproduced as ChromaPipeline's is
  (``dispatch._key_mask``).
  Grid ``(H / p, W / p)`` of the latent ``[B, C, H, W]`` (patches row-major). CogView3-Plus
  (``CogView3PlusTransformer2DModel``) alike, with ``CogVideoXAttnProcessor2_0``.
- CogVideoX (1.0 and 1.5) and ConsisID (``ConsisIDTransformer3DModel``, the same blocks and processor): ``CogVideoXTransformer3DModel``, ``transformer_blocks.{i}.attn1`` with
  ``CogVideoXAttnProcessor2_0`` (SDPA), ``[text, video]``. Grid ``(frames, H / p, W / p)`` of the latent
  ``[B, F, C, H, W]``, ``frames = ceil(F / p_t)`` with CogVideoX 1.5's temporal patch ``p_t`` (tokens are
  frame-major, then row-major).
- HiDream-I1: ``HiDreamImageTransformer2DModel``, ``double_stream_blocks.{i}`` then ``single_stream_blocks.{j}``
  (attention ``.block.attn1``, ``HiDreamAttnProcessor``, SDPA), ``[image, text]`` in both kinds of block. The
  text of every block is ``[T5, Llama (last listed layer), Llama (this block's layer)]``: ``T5 + 2 * L`` tokens,
  the same in every block. Non-square latents are padded to ``max_seq`` image tokens (their keys zeroed by the
  processor, as the model does); the grid ``(H / p, W / p)`` keeps the real image's rows only.
- Qwen-Image (and its Edit pipelines): ``QwenImageTransformer2DModel``, ``transformer_blocks.{i}`` with
  ``QwenDoubleStreamAttnProcessor2_0`` (dispatcher), ``[text, image]``. Its pipelines pass
  ``encoder_hidden_states_mask`` ``[B, T]`` when the prompts of a batch have padding (``None`` when every token
  is valid, e.g. one prompt per forward); the processor turns it into the key mask ``[B, 1, 1, N]``, which
  capture passes on to ``joint_attention`` (masked text columns of the maps are 0).
  Grid: the first entry of ``img_shapes`` (the generated image; Edit appends the condition images after it).
- HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``, ``HunyuanImageAttnProcessor``) and HunyuanVideo
  (``HunyuanVideoTransformer3DModel``, ``HunyuanVideoAttnProcessor2_0``): Flux-style layer names
  (``transformer_blocks.{i}``, ``single_transformer_blocks.{j}``), dispatcher, ``[image, text]``. Their forwards
  build a key mask ``[B, 1, 1, N]`` from ``encoder_attention_mask`` (valid text first): capture passes it on.
  HunyuanImage's text is ``[valid ByT5, valid MLLM, padding]`` when a second text encoder is given (its length
  is the sum). Grid ``(H / p, W / p)``, video ``(F / p_t, H / p, W / p)`` of the latent.
- HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, ``HunyuanVideo15AttnProcessor2_0``, only
  ``transformer_blocks.{i}``): ``[video, text]`` where the text block is ``[image condition, ByT5, MLLM]``
  tokens (the image-condition tokens are masked for text-to-video), valid tokens first; its processor builds the
  outer product ``m_i & m_j`` ``[B, 1, N, N]`` of the token mask: keys ``m``, and the masked text queries get
  SDPA's zero rows (reproduced, see ``dispatch._key_mask``).
- Chroma (``ChromaTransformer2DModel``, Flux's ``FluxAttnProcessor``): the Flux.1 adapter. Its blocks turn
  ``attention_mask`` ``[B, N]`` into ``m_i * m_j`` ``[B, 1, N, N]``: a boolean mask is captured as
  HunyuanVideo 1.5's; the ChromaPipeline passes a float 0 / 1 mask, which SDPA adds to the scores as a bias (not
  a mask): reproduced exactly (key bias ``m`` for the image and kept text queries, no bias for the padding text
  queries, whose t2i rows are refused; see ``dispatch._key_mask``).
- Ovis-Image and LongCat-Image: Flux-style transformers in modules of their own (``OvisImageAttnProcessor``,
  ``LongCatImageAttnProcessor``; same layers, forward arguments and ``[text, image]`` order as Flux.1, whose
  adapter they reuse). Their forwards take no attention mask (the pipelines zero padded text embeddings).
"""
from __future__ import annotations

import math
from typing import Callable, List, Tuple

import torch

from .base import SKIP, CaptureSite, LayerSpec
from .dispatch import DispatchAdapter
from .flux import FluxAdapter

__all__ = [
    "CogView4Adapter", "CogView3PlusAdapter", "CogVideoXAdapter", "ConsisIDAdapter", "HiDreamAdapter", "QwenImageAdapter",
    "OvisImageAdapter", "LongCatImageAdapter", "HunyuanImageAdapter", "HunyuanVideoAdapter", "HunyuanVideo15Adapter",
    "ChromaAdapter",
  
    "AuraFlowAdapter", "Lumina2Adapter", "EasyAnimateAdapter", "MotifVideoAdapter", "HunyuanVideoFramepackAdapter",
    "PRXAdapter", "NucleusMoEImageAdapter", "MochiAdapter",
    "BriaAdapter", "BriaFiboAdapter", "Flux3Adapter", "Krea2Adapter", "ErnieImageAdapter", "GlmImageAdapter",
    "JoyImageAdapter", "JoyImageEditPlusAdapter", "ZImageAdapter",
]


def _latent_grid(transformer, hidden_states: torch.Tensor) -> Tuple[int, int]:
    """``(H / p, W / p)``: the image-token grid of a latent ``[B, C, H, W]`` (or ``[..., H, W]``) patchified by
    ``transformer.config.patch_size`` (patches row-major)."""
    p = transformer.config.patch_size
    return hidden_states.shape[-2] // p, hidden_states.shape[-1] // p

class _BlocksAttn1(DispatchAdapter):
    """Families with one joint attention per block: ``transformer_blocks.{i}.attn1``, integer ``i``."""

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"transformer_blocks.{i}", b.attn1, "joint") for i, b in enumerate(transformer.transformer_blocks)]


class CogView4Adapter(_BlocksAttn1):
    family = "cogview4"
    cfg_batched = False  # CogView4Pipeline: conditional and unconditional forwards one after the other
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import CogView4Transformer2DModel

        return (CogView4Transformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor

        return (CogView4AttnProcessor,)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
        grid = _latent_grid(transformer, hidden_states)
        return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


class CogVideoXAdapter(_BlocksAttn1):
    family = "cogvideox"
    cfg_batched = True  # CogVideoXPipeline batches [uncond, cond] in one forward
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import CogVideoXTransformer3DModel

        return (CogVideoXTransformer3DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        return (CogVideoXAttnProcessor2_0,)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, F, C, H, W] latent video
        p, p_t = transformer.config.patch_size, getattr(transformer.config, "patch_size_t", None)
        frames = hidden_states.shape[1] if p_t is None else -(-hidden_states.shape[1] // p_t)
        grid = (frames, hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


class CogView3PlusAdapter(CogView4Adapter):
    family = "cogview3plus"
    cfg_batched = True  # CogView3PlusPipeline batches [uncond, cond] in one forward

    @classmethod
    def transformer_classes(cls):
        from diffusers import CogView3PlusTransformer2DModel

        return (CogView3PlusTransformer2DModel,)

    processor_classes = CogVideoXAdapter.processor_classes


class ConsisIDAdapter(CogVideoXAdapter):
    family = "consisid"

    @classmethod
    def transformer_classes(cls):
        from diffusers import ConsisIDTransformer3DModel

        return (ConsisIDTransformer3DModel,)


class HiDreamAdapter(DispatchAdapter):
    family = "hidream"
    cfg_batched = True  # HiDreamImagePipeline batches [uncond, cond] in one forward
    text_at = "end"

    @classmethod
    def transformer_classes(cls):
        from diffusers import HiDreamImageTransformer2DModel

        return (HiDreamImageTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_hidream_image import HiDreamAttnProcessor

        return (HiDreamAttnProcessor,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        double = [
            LayerSpec(f"double_stream_blocks.{i}", b.block.attn1, "joint")
            for i, b in enumerate(transformer.double_stream_blocks)
        ]
        single = [
            LayerSpec(f"single_stream_blocks.{j}", b.block.attn1, "single")
            for j, b in enumerate(transformer.single_stream_blocks)
        ]
        return double + single

    @classmethod
    def index_to_name(cls, transformer, index: int) -> str:
        n_double = len(transformer.double_stream_blocks)
        if index < n_double:
            return f"double_stream_blocks.{index}"
        return f"single_stream_blocks.{index - n_double}"

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, H, W] latent (pre-patchified input: refused below)
        if hidden_states.ndim != 4:
            raise ValueError(
                "capture on HiDream needs the latent as [B, C, H, W] (hidden_states), got a pre-patchified "
                f"{tuple(hidden_states.shape)}"
            )
        llama = bound["encoder_hidden_states_llama3"]  # [layers, B, L, D] (or a list of [B, L, D])
        text_len = bound["encoder_hidden_states_t5"].shape[1] + 2 * llama[0].shape[-2]
        grid = _latent_grid(transformer, hidden_states)
        return text_len, grid, hidden_states.shape[0]


class QwenImageAdapter(DispatchAdapter):
    family = "qwenimage"
    cfg_batched = False  # QwenImagePipeline: true CFG, the unconditional forward inside cache_context("uncond")
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import QwenImageTransformer2DModel

        return (QwenImageTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

        return (QwenDoubleStreamAttnProcessor2_0,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"transformer_blocks.{i}", b.attn, "joint") for i, b in enumerate(transformer.transformer_blocks)]

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, N_img, C] packed latents, generated image first
        img_shapes = bound.get("img_shapes")
        grid = None
        if img_shapes:
            first = img_shapes[0]  # pipelines: per sample a list of (frames, h, w), the generated image first
            if isinstance(first[0], (list, tuple)):
                first = first[0]
            frames, h, w = (int(x) for x in first)
            grid = (h, w) if frames == 1 else (frames, h, w)
        return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


class OvisImageAdapter(FluxAdapter):
    family = "ovis_image"
    cfg_batched = False  # OvisImagePipeline: conditional and unconditional forwards one after the other

    @classmethod
    def transformer_classes(cls):
        from diffusers import OvisImageTransformer2DModel

        return (OvisImageTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_ovis_image import OvisImageAttnProcessor

        return (OvisImageAttnProcessor,)


class LongCatImageAdapter(FluxAdapter):
    family = "longcat_image"
    cfg_batched = False

    @classmethod
    def transformer_classes(cls):
        from diffusers import LongCatImageTransformer2DModel

        return (LongCatImageTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_longcat_image import LongCatImageAttnProcessor

        return (LongCatImageAttnProcessor,)


class HunyuanImageAdapter(DispatchAdapter):
    family = "hunyuanimage"
    cfg_batched = False  # HunyuanImagePipeline: its guider runs one forward per condition (cache_context "pred_uncond")
    text_at = "end"

    @classmethod
    def transformer_classes(cls):
        from diffusers import HunyuanImageTransformer2DModel

        return (HunyuanImageTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_hunyuanimage import HunyuanImageAttnProcessor

        return (HunyuanImageAttnProcessor,)

    layers = FluxAdapter.layers
    index_to_name = FluxAdapter.index_to_name

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
        if hidden_states.ndim != 4:
            raise ValueError(f"capture on HunyuanImage needs a [B, C, H, W] latent, got {tuple(hidden_states.shape)}")
        text_len = bound["encoder_hidden_states"].shape[1]
        second = bound.get("encoder_hidden_states_2")
        if second is not None and transformer.context_embedder_2 is not None:  # ByT5 tokens join the text block
            text_len += second.shape[1]
        p_h, p_w = transformer.config.patch_size
        return text_len, (hidden_states.shape[-2] // p_h, hidden_states.shape[-1] // p_w), hidden_states.shape[0]


def _video_grid(transformer, hidden_states):
    """``(frames, h, w)`` of a ``[B, C, F, H, W]`` latent patchified by ``patch_size_t`` x ``patch_size``^2."""
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    return (hidden_states.shape[2] // p_t, hidden_states.shape[3] // p, hidden_states.shape[4] // p)


class HunyuanVideoAdapter(DispatchAdapter):
    family = "hunyuanvideo"
    cfg_batched = False  # HunyuanVideoPipeline: true CFG, the unconditional forward inside cache_context("uncond")
    text_at = "end"

    @classmethod
    def transformer_classes(cls):
        from diffusers import HunyuanVideoTransformer3DModel

        return (HunyuanVideoTransformer3DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        return (HunyuanVideoAttnProcessor2_0,)

    layers = FluxAdapter.layers
    index_to_name = FluxAdapter.index_to_name

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
        return bound["encoder_hidden_states"].shape[1], _video_grid(transformer, hidden_states), hidden_states.shape[0]


class HunyuanVideo15Adapter(_BlocksAttn1):
    family = "hunyuanvideo15"
    cfg_batched = False  # HunyuanVideo15Pipeline: its guider runs one forward per condition
    text_at = "end"

    @classmethod
    def transformer_classes(cls):
        from diffusers import HunyuanVideo15Transformer3DModel

        return (HunyuanVideo15Transformer3DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

        return (HunyuanVideo15AttnProcessor2_0,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"transformer_blocks.{i}", b.attn, "joint") for i, b in enumerate(transformer.transformer_blocks)]

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
        # text block: [image-condition tokens, ByT5, MLLM] (image_embeds [B, T_img, D] -> one token each)
        text_len = sum(bound[name].shape[1] for name in ("image_embeds", "encoder_hidden_states_2", "encoder_hidden_states"))
        return text_len, _video_grid(transformer, hidden_states), hidden_states.shape[0]


class ChromaAdapter(FluxAdapter):
    family = "chroma"
    cfg_batched = False  # ChromaPipeline: the unconditional forward inside cache_context("uncond")

    @classmethod
    def transformer_classes(cls):
        from diffusers import ChromaTransformer2DModel

        return (ChromaTransformer2DModel,)


# ------------------------------------------------------------------------------------------------------------------
# AuraFlow, Lumina2, EasyAnimate, Motif-Video, HunyuanVideo FramePack, PRX, NucleusMoE-Image, Mochi
# ------------------------------------------------------------------------------------------------------------------


def _double_single_layers(transformer, double: str, single: str) -> List[LayerSpec]:
    """``{double}.{i}`` (text comes as ``encoder_hidden_states``) then ``{single}.{j}`` (text already in the
    sequence), each block's attention module at ``.attn``."""
    return [LayerSpec(f"{double}.{i}", b.attn, "joint") for i, b in enumerate(getattr(transformer, double))] + [
        LayerSpec(f"{single}.{j}", b.attn, "single") for j, b in enumerate(getattr(transformer, single))
    ]


class AuraFlowAdapter(DispatchAdapter):
    """AuraFlow: ``AuraFlowTransformer2DModel``, ``joint_transformer_blocks.{i}`` (MM-DiT) then
    ``single_transformer_blocks.{j}``, ``AuraFlowAttnProcessor2_0`` (or its fused variant; SDPA), ``[text, image]``.
    The text block is ``[8 register tokens, prompt tokens]`` (the model prepends its learnt ``register_tokens``):
    prompt token ``t`` is text column ``8 + t``. No mask. Grid ``(H / p, W / p)`` of the latent ``[B, C, H, W]``."""

    family = "auraflow"
    cfg_batched = True  # AuraFlowPipeline batches [uncond, cond] in one forward
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import AuraFlowTransformer2DModel

        return (AuraFlowTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0, FusedAuraFlowAttnProcessor2_0

        return (AuraFlowAttnProcessor2_0, FusedAuraFlowAttnProcessor2_0)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return _double_single_layers(transformer, "joint_transformer_blocks", "single_transformer_blocks")

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
        text_len = transformer.register_tokens.shape[1] + bound["encoder_hidden_states"].shape[1]
        return text_len, _latent_grid(transformer, hidden_states), hidden_states.shape[0]


def _gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, :, index[b, n]]``: ``t`` ``[B, H, N, D]`` (or ``[B, N]``), ``index`` ``[B, N]`` -> like ``t``."""
    if t.ndim == 2:
        return t.gather(1, index)
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


class _ReorderingSite:
    """Stands in for a :class:`~seg4diff_fast.capture.base.CaptureSite` of a layer whose joint sequence needs its
    tokens reordered before one text block and the grid fit it: Lumina2's ``[c_b text, image, padding]`` per
    sample (the image starts at another position in each), FramePack's ``[history, generated video, text]`` (the
    store keeps the FIRST image rows). Attention is invariant under a permutation of the tokens applied to q, k, v
    and the masks (and, inversely, to ``out``), so the layer's attention runs on the reordered sequence.
    ``order(site, q, key_mask, text_slice)``: the model position of each reordered position, ``[B, N]`` or ``[N]``,
    or ``None`` (the model's order fits); one function for every layer (the layer is ``site``: compiled blocks share
    a graph). Everything else is the wrapped site's."""

    def __init__(self, site: CaptureSite, order: Callable):
        self._site = site
        self._order = order

    def __getattr__(self, name):
        return getattr(self._site, name)

    def attention(self, q, k, v, text_slice: slice, scale=None, original=None, key_mask=None, query_mask=None):
        """As :meth:`CaptureSite.attention`: ``q, k, v`` ``[B, H, N, D]`` in the model's order, ``text_slice`` in the
        reordered one; returns ``out`` ``[B, H, N, D]`` in the model's order."""
        extra = {} if scale is None else {"scale": scale}
        order = self._order(self._site, q, key_mask, text_slice)
        if order is None:
            masks = {name: m for name, m in (("key_mask", key_mask), ("query_mask", query_mask)) if m is not None}
            return self._site.attention(q, k, v, text_slice, original=original, **masks, **extra)
        order = order.expand(q.shape[0], -1)  # [B, N]
        p = torch.arange(q.shape[2], device=q.device).expand_as(order)
        inverse = torch.empty_like(order).scatter_(1, order, p)  # [B, N]: reordered position of each model position

        def original_reordered(q_, k_, v_, rows):  # the layer's own attention, run in the model's order
            o, i = (order, inverse) if rows is None else (order[rows], inverse[rows])
            return _gather_tokens(original(*(_gather_tokens(t, i) for t in (q_, k_, v_)), rows), o)

        masks = {name: _gather_tokens(m, order) for name, m in (("key_mask", key_mask), ("query_mask", query_mask))
                 if m is not None}
        out = self._site.attention(
            *(_gather_tokens(t, order) for t in (q, k, v)), text_slice,
            original=None if original is None else original_reordered, **masks, **extra,
        )  # [B, H, N, D] reordered
        return _gather_tokens(out, inverse)


class Lumina2Adapter(DispatchAdapter):
    """Lumina-Image 2.0: ``Lumina2Transformer2DModel``, ``layers.{i}`` (``Lumina2AttnProcessor2_0``, SDPA; its
    ``noise_refiner`` / ``context_refiner`` blocks attend within the image or the text only: refused). Per sample
    the joint sequence is ``[c_b valid text tokens (the first c_b of encoder_attention_mask's), image, padding]``
    with a key mask when the ``c_b`` differ; captured through :class:`_ReorderingSite`. The text block of the maps
    is ``max_b c_b`` columns (a sample's columns past its ``c_b`` are 0). Grouped-query heads are repeated by the
    processor before SDPA. Grid ``(H / p, W / p)``. Lumina2Pipeline runs its unconditional forward as a second
    forward on the same latents (not a step with ``batch="cond"``: ``CaptureHandle._second_pass``)."""

    family = "lumina2"
    cfg_batched = False
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import Lumina2Transformer2DModel

        return (Lumina2Transformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0

        return (Lumina2AttnProcessor2_0,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"layers.{i}", b.attn, "joint") for i, b in enumerate(transformer.layers)]

    @classmethod
    def not_capturable(cls, transformer):
        why = {"noise_refiner": "image tokens only", "context_refiner": "text tokens only"}
        return {f"{name}.{i}": f"a Lumina2 refiner block: it attends within the {reason}, no text-image attention"
                for name, reason in why.items() for i in range(len(getattr(transformer, name)))}

    @staticmethod
    def _text_first(site: CaptureSite, q, key_mask, text_slice):
        """Per sample ``[c_b text, image, padding]`` (``key_mask`` ``[B, N]`` True on the first ``c_b + N_img``
        positions; None when every ``c_b`` is the same: no padding) -> ``[c_b text, padding, image]``: one text
        block ``[0, max c_b)`` whose padded columns are masked keys, the image rows after it."""
        if key_mask is None:
            return None
        h, w = site.context.grid
        n, texts = q.shape[2], text_slice.stop
        valid_text = key_mask.sum(1, keepdim=True) - h * w  # [B, 1] c_b (no device sync)
        p = torch.arange(n, device=q.device)[None, :]  # [1, N] reordered position
        # its model position: a text token, then padding (after the model's image), then the image
        return torch.where(p < valid_text, p, torch.where(p < texts, p + h * w, p - texts + valid_text))

    @classmethod
    def make_processor(cls, spec: LayerSpec, site: CaptureSite, old):
        return super().make_processor(spec, _ReorderingSite(site, cls._text_first), old)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
        valid = bound["encoder_attention_mask"].sum(1)  # [B]: the model reads it with .tolist() too (a sync)
        grid = _latent_grid(transformer, hidden_states)
        return int(valid.max()), grid, hidden_states.shape[0]


class EasyAnimateAdapter(_BlocksAttn1):
    """EasyAnimate V5.1: ``EasyAnimateTransformer3DModel``, ``transformer_blocks.{i}.attn1``
    (``EasyAnimateAttnProcessor2_0``, SDPA; MM-DiT blocks project the text separately, the blocks past
    ``mmdit_layers`` concatenate it first: both ``[text, video]``, RoPE on the video part). Text block: the
    ``encoder_hidden_states`` tokens, then the ``encoder_hidden_states_t5`` ones when given. No mask (the pipeline's
    text mask is for its text encoder only). Grid ``(F, H / p, W / p)`` of the latent ``[B, C, F, H, W]`` (no
    temporal patch)."""

    family = "easyanimate"
    cfg_batched = True  # EasyAnimatePipeline batches [uncond, cond] in one forward
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import EasyAnimateTransformer3DModel

        return (EasyAnimateTransformer3DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_easyanimate import EasyAnimateAttnProcessor2_0

        return (EasyAnimateAttnProcessor2_0,)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
        t5 = bound.get("encoder_hidden_states_t5")
        text_len = bound["encoder_hidden_states"].shape[1] + (0 if t5 is None else t5.shape[1])
        p = transformer.config.patch_size
        grid = (hidden_states.shape[2], hidden_states.shape[3] // p, hidden_states.shape[4] // p)
        return text_len, grid, hidden_states.shape[0]


class MotifVideoAdapter(DispatchAdapter):
    """Motif-Video: ``MotifVideoTransformer3DModel``, ``transformer_blocks.{i}`` then ``single_transformer_blocks.{j}``
    (``.attn``, ``MotifVideoAttnProcessor2_0``, dispatcher; the single blocks hand the processor the text part
    apart too), ``[video, text]`` with the text block ``[image_embeds tokens (image-to-video), prompt tokens]``.
    Its forward builds the key mask ``[B, 1, 1, N]`` from ``encoder_attention_mask`` (captured as a key mask). The
    last ``num_decoder_layers`` single blocks attend from the video to the encoder's video tokens (no text):
    refused. The optional text cross-attention (``.cross_attn``, a second attention to the text) is not captured:
    the maps are the joint attention's. Grid ``(F / p_t, H / p, W / p)``."""

    family = "motif_video"
    cfg_batched = False  # MotifVideoPipeline: its guider runs one forward per condition (cache_context "pred_uncond")
    text_at = "end"

    @classmethod
    def transformer_classes(cls):
        from diffusers import MotifVideoTransformer3DModel

        return (MotifVideoTransformer3DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_motif_video import MotifVideoAttnProcessor2_0

        return (MotifVideoAttnProcessor2_0,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        specs = _double_single_layers(transformer, "transformer_blocks", "single_transformer_blocks")
        return specs[: len(specs) - transformer.num_decoder_layers]

    @classmethod
    def not_capturable(cls, transformer):
        singles = len(transformer.single_transformer_blocks)
        return {f"single_transformer_blocks.{j}": "a Motif-Video decoder block: it attends to the encoder's video "
                "tokens, not to the text" for j in range(singles - transformer.num_decoder_layers, singles)}

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
        image_embeds = bound.get("image_embeds")  # [B, T_img, D] or None
        text_len = bound["encoder_hidden_states"].shape[1] + (0 if image_embeds is None else image_embeds.shape[1])
        return text_len, _video_grid(transformer, hidden_states), hidden_states.shape[0]


class HunyuanVideoFramepackAdapter(HunyuanVideoAdapter):
    """FramePack: ``HunyuanVideoFramepackTransformer3DModel``, HunyuanVideo's blocks and processor, ``[history,
    generated video, text]``: the history tokens (``latents_history_4x``, ``_2x``, ``latents_clean``, each of its
    own patch size, in that order) join the image part in front of the generated frames. The grid is the
    generated frames' ``(F / p_t, H / p, W / p)``; the layer's attention runs on ``[generated, history, text]``
    (:class:`_ReorderingSite`), so the store keeps the generated frames' rows (their softmax over every key,
    history included, as the model computes it). Text block: ``[image_embeds tokens, prompt tokens]``, key mask
    from ``encoder_attention_mask`` when the batch has several samples; a batch of one cuts the prompt to its
    valid tokens. HunyuanVideoFramepackPipeline runs its true-CFG forward as a second forward on the same
    latents (not a step with ``batch="cond"``: ``CaptureHandle._second_pass``)."""

    family = "hunyuanvideo_framepack"

    @classmethod
    def transformer_classes(cls):
        from diffusers import HunyuanVideoFramepackTransformer3DModel

        return (HunyuanVideoFramepackTransformer3DModel,)

    @staticmethod
    def _generated_first(site: CaptureSite, q, key_mask, text_slice):
        """``[history, generated, text]`` -> ``[generated, history, text]``: ``[N]``."""
        n_gen = math.prod(site.context.grid)
        n_hist = text_slice.start - n_gen
        p = torch.arange(q.shape[2], device=q.device)
        return torch.where(p < n_gen, p + n_hist, torch.where(p < text_slice.start, p - n_gen, p))

    @classmethod
    def make_processor(cls, spec: LayerSpec, site: CaptureSite, old):
        return super().make_processor(spec, _ReorderingSite(site, cls._generated_first), old)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, F, H, W] generated latent video
        mask = bound["encoder_attention_mask"]  # [B, T]
        prompt = bound["encoder_hidden_states"].shape[1] if hidden_states.shape[0] > 1 else int(mask.sum())
        text_len = bound["image_embeds"].shape[1] + prompt  # a batch of one: the forward cuts the padding off
        return text_len, _video_grid(transformer, hidden_states), hidden_states.shape[0]


def _image_queries_call(capture_call: Callable, text_at: str) -> Callable:
    """Wraps the capture function of a capture class (:func:`dispatch._capture_call`, called with the processor
    first: its layer is ``processor.site``) for a processor that calls the dispatcher with ``query``
    ``[B, N_img, H, D]`` and ``key, value`` ``[B, N, H, D]`` (the joint sequence), and a key mask ``[B, N]`` (the
    dispatcher's native backend reads it as ``[B, 1, 1, N]``), ``[B, 1, 1, N]`` or None. Returns
    ``[B, N_img, H, D]``."""

    def attention(processor, query, key, value, attn_mask=None, **kwargs):
        n_img, n_txt = query.shape[1], key.shape[1] - query.shape[1]
        if processor.site.context.rows == SKIP:  # not a step: the processor's own call, as given
            return _dispatcher(query, key, value, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None and attn_mask.ndim == 2:
            attn_mask = attn_mask[:, None, None, :]
        pad = query.new_zeros(query.shape[0], n_txt, *query.shape[2:])  # [B, T, H, D] text queries
        joint = torch.cat([pad, query] if text_at == "start" else [query, pad], dim=1)  # [B, N, H, D]
        out = capture_call(processor, joint, key, value, attn_mask, **kwargs)  # [B, N, H, D]
        return out[:, n_txt:] if text_at == "start" else out[:, :n_img]

    return attention


def _dispatcher(*args, **kwargs):
    """diffusers' ``dispatch_attention_fn`` as it is at the call."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(*args, **kwargs)


class _ImageQueriesAdapter(DispatchAdapter):
    """Families whose attention has the image tokens as its only queries and the joint sequence (``[text, image]``
    or ``[image, text]``) as keys and values: the text tokens are never updated by attention (PRX, NucleusMoE-Image).
    Their i2t map is well-defined, the image rows of a joint softmax over every key; t2i does not exist (no text
    query), so only ``capture="i2t"`` is served. The capture processor pads the queries with ``T`` zero text
    queries at the text's place, runs the joint attention on the ``N`` tokens and returns the image rows: the text
    rows' outputs are discarded (``T / N_img`` extra attention rows, e.g. 6 % for 256 text tokens at 1024^2)."""

    capture_wrapper = staticmethod(_image_queries_call)

    @classmethod
    def make_processor(cls, spec: LayerSpec, site: CaptureSite, old):
        if site.store.capture != "i2t":
            raise ValueError(
                f"layer {spec.name!r} of {cls.family}: its attention has image queries only (the text tokens are keys "
                f"and values, never queries), so there are no t2i maps; register with capture='i2t' "
                f"(got {site.store.capture!r})"
            )
        return super().make_processor(spec, site, old)


class PRXAdapter(_ImageQueriesAdapter):
    """PRX: ``PRXTransformer2DModel``, ``blocks.{i}`` (``.attention``, ``PRXAttnProcessor2_0``, dispatcher): image
    queries, keys ``[text, image]`` with the key mask ``[B, 1, 1, N]`` of ``attention_mask`` (``[B, T]``). Text
    tokens are the projected prompt, the same in every block. Grid ``(H / p, W / p)`` (patches row-major)."""

    family = "prx"
    cfg_batched = True  # PRXPipeline batches [uncond, cond] in one forward
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import PRXTransformer2DModel

        return (PRXTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_prx import PRXAttnProcessor2_0

        return (PRXAttnProcessor2_0,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"blocks.{i}", b.attention, "joint") for i, b in enumerate(transformer.blocks)]

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
        grid = _latent_grid(transformer, hidden_states)
        return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


class NucleusMoEImageAdapter(_ImageQueriesAdapter):
    """NucleusMoE-Image: ``NucleusMoEImageTransformer2DModel``, ``transformer_blocks.{i}`` (``.attn``,
    ``NucleusMoEAttnProcessor2_0``, dispatcher; grouped-query heads repeated before the call): image queries, keys
    ``[image, text]`` with the key mask ``[B, N]`` built from ``encoder_hidden_states_mask``. Grid: the first entry
    of ``img_shapes`` (packed latents, as Qwen-Image). NucleusMoEImagePipeline runs its unconditional forward
    as a second forward on the same latents (not a step with ``batch="cond"``: ``CaptureHandle._second_pass``)."""

    family = "nucleusmoe_image"
    cfg_batched = False
    text_at = "end"

    @classmethod
    def transformer_classes(cls):
        from diffusers import NucleusMoEImageTransformer2DModel

        return (NucleusMoEImageTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoEAttnProcessor2_0

        return (NucleusMoEAttnProcessor2_0,)

    layers = QwenImageAdapter.layers
    read_forward = QwenImageAdapter.read_forward


class MochiAdapter(_BlocksAttn1):
    """Mochi 1: ``MochiTransformer3DModel``, ``transformer_blocks.{i}.attn1`` (``MochiAttnProcessor2_0``, SDPA). Its
    processor calls attention once PER SAMPLE, on ``[video, that sample's valid text tokens]`` (gathered by
    ``encoder_attention_mask``): one layer call is ``B`` attention calls of different lengths, while a capture site
    records one call per layer call. So capture serves a transformer batch of one (the text block: the valid tokens,
    in order) and refuses a larger batch before the forward runs (MochiPipeline batches ``[uncond, cond]`` under
    guidance). Grid ``(F, H / p, W / p)`` of the latent ``[B, C, F, H, W]`` (no temporal patch)."""

    family = "mochi"
    cfg_batched = True
    text_at = "end"

    @classmethod
    def transformer_classes(cls):
        from diffusers import MochiTransformer3DModel

        return (MochiTransformer3DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.attention_processor import MochiAttnProcessor2_0

        return (MochiAttnProcessor2_0,)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
        if hidden_states.shape[0] != 1:
            raise ValueError(
                f"capture on Mochi needs a transformer batch of one, got {hidden_states.shape[0]}: MochiAttnProcessor2_0 "
                "calls attention once per sample (on the video and that sample's valid text tokens), and capture records "
                "one attention call per layer call. Call the transformer once per sample (MochiPipeline batches "
                "[uncond, cond] when guidance_scale > 1)"
            )
        text_len = int(bound["encoder_attention_mask"].sum())  # the processor gathers the valid tokens (a sync too)
        p = transformer.config.patch_size
        grid = (hidden_states.shape[2], hidden_states.shape[3] // p, hidden_states.shape[4] // p)
        return text_len, grid, 1


# ------------------------------------------------------------------------------------------------------------------
# Bria, Bria FIBO, Flux.3, Krea 2, ERNIE-Image, GLM-Image, JoyImage, JoyImage Edit Plus, Z-Image.
# Each is one of the existing shapes (Flux-style layers and ids, one attention per block) with the text position,
# its length and the grid of its own forward. Masks: FIBO's pipeline, Krea 2, ERNIE-Image, JoyImage Edit Plus and
# Z-Image build boolean key masks [B, 1, 1, N] (captured); GLM-Image turns a text mask into a float 0 / 1 matrix
# that SDPA adds to the scores (reproduced as a key bias, as CogView4's and Chroma's).


def _image_grid(frames: int, h: int, w: int):
    """``(h, w)`` for one frame (an image), else ``(frames, h, w)`` (Qwen-Image's convention)."""
    return (h, w) if frames == 1 else (frames, h, w)


class BriaAdapter(FluxAdapter):
    """``BriaTransformer2DModel`` (Bria 3.x): Flux.1's layers, ``[text, image]``, forward arguments and ``img_ids``;
    ``BriaAttnProcessor`` in both kinds of block. Its blocks pass no attention mask."""

    family = "bria"
    cfg_batched = True  # BriaPipeline batches [uncond, cond] in one forward

    @classmethod
    def transformer_classes(cls):
        from diffusers import BriaTransformer2DModel

        return (BriaTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_bria import BriaAttnProcessor

        return (BriaAttnProcessor,)


class BriaFiboAdapter(FluxAdapter):
    """``BriaFiboTransformer2DModel``: Flux.1's layers and ids; the text block of every block is
    ``encoder_hidden_states.shape[1]`` tokens (the per-block ``text_encoder_layers`` are concatenated along the
    channels, not the sequence). Double-stream blocks run ``BriaFiboAttnProcessor``, single-stream ones Bria's
    ``BriaAttnProcessor``. BriaFiboPipeline passes a boolean key mask ``[B, 1, 1, N]`` (``joint_attention_kwargs``)
    when prompts are padded: captured."""

    family = "bria_fibo"
    # BriaFiboPipeline batches [uncond, cond] but has no do_classifier_free_guidance: batch="cond" keeps every row
    cfg_batched = True

    @classmethod
    def transformer_classes(cls):
        from diffusers import BriaFiboTransformer2DModel

        return (BriaFiboTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_bria import BriaAttnProcessor
        from diffusers.models.transformers.transformer_bria_fibo import BriaFiboAttnProcessor

        return (BriaFiboAttnProcessor,) if spec.kind == "joint" else (BriaAttnProcessor,)


class Flux3Adapter(FluxAdapter):
    """``Flux3Transformer2DModel``: per-mode blocks first (``txt_mode_blocks``, ``mode_blocks.image``,
    ``mode_blocks.image_cond``: each attends within its own tokens, no text-image attention), then
    ``single_transformer_blocks.{j}`` over ``[text, image, reference images]`` (``Flux3AttnProcessor``, no mask).
    Grid from ``img_ids`` (``(t, h, w, l)``, the generated image only); the store keeps the generated image's
    rows, as for Flux.2's references."""

    family = "flux3"
    cfg_batched = False  # no pipeline in diffusers 0.42

    @classmethod
    def transformer_classes(cls):
        from diffusers import Flux3Transformer2DModel

        return (Flux3Transformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor

        return (Flux3AttnProcessor,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [
            LayerSpec(f"single_transformer_blocks.{j}", b.attn, "single")
            for j, b in enumerate(transformer.single_transformer_blocks)
        ]

    @classmethod
    def not_capturable(cls, transformer):
        why = "a per-mode block of Flux.3: its attention sees one token mode only (no text-image attention)"
        names = [f"txt_mode_blocks.{i}" for i in range(len(transformer.txt_mode_blocks))]
        names += [f"mode_blocks.{m}.{i}" for m, blocks in transformer.mode_blocks.items() for i in range(len(blocks))]
        return {name: why for name in names}


class Krea2Adapter(_BlocksAttn1):
    """``Krea2Transformer2DModel``: single-stream ``transformer_blocks.{i}.attn`` (``Krea2AttnProcessor``) over
    ``[text, image]``; the text-fusion blocks before them see text only. Grouped-query attention is expanded by
    the processor before the dispatcher (q, k, v have the same heads there). ``encoder_attention_mask`` ``[B, T]``
    becomes a boolean key mask ``[B, 1, 1, N]``: captured. Grid from the image rows of ``position_ids``
    ``[T + N_img, 3]`` (``(0, h, w)``)."""

    family = "krea2"
    cfg_batched = False  # Krea2Pipeline: the negative prompt's forward after the positive one
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import Krea2Transformer2DModel

        return (Krea2Transformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_krea2 import Krea2AttnProcessor

        return (Krea2AttnProcessor,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"transformer_blocks.{i}", b.attn, "single") for i, b in enumerate(transformer.transformer_blocks)]

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, N_img, C] packed latent
        text_len = bound["encoder_hidden_states"].shape[1]  # [B, T, text layers, D]
        position_ids = bound["position_ids"]  # [T + N_img, 3]
        if position_ids.shape[0] != text_len + hidden_states.shape[1]:
            raise ValueError(
                f"position_ids has {position_ids.shape[0]} rows, expected {text_len} text + {hidden_states.shape[1]} "
                "image tokens"
            )
        return text_len, position_ids[text_len:], hidden_states.shape[0]  # the store reads the grid from the ids


class ErnieImageAdapter(DispatchAdapter):
    """``ErnieImageTransformer2DModel``: ``layers.{i}.self_attention`` (``ErnieImageSingleStreamAttnProcessor``)
    over ``[image, text]``; ``text_lens`` give the boolean key mask ``[B, 1, 1, N]`` of the padded text
    (``text_bth`` ``[B, T, D]``): captured. Grid ``(H / p, W / p)`` of the latent ``[B, C, H, W]``."""

    family = "ernie_image"
    cfg_batched = True  # ErnieImagePipeline batches [uncond, cond] in one forward
    text_at = "end"

    @classmethod
    def transformer_classes(cls):
        from diffusers import ErnieImageTransformer2DModel

        return (ErnieImageTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_ernie_image import ErnieImageSingleStreamAttnProcessor

        return (ErnieImageSingleStreamAttnProcessor,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"layers.{i}", b.self_attention, "single") for i, b in enumerate(transformer.layers)]

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
        grid = _latent_grid(transformer, hidden_states)
        return bound["text_bth"].shape[1], grid, hidden_states.shape[0]


class GlmImageAdapter(CogView4Adapter):
    """``GlmImageTransformer2DModel``: CogView4's layout (``transformer_blocks.{i}.attn1``, ``[text, image]``, RoPE
    on the image part, grid ``(H / p, W / p)``) with ``GlmImageAttnProcessor`` (dispatcher). A text
    ``attention_mask`` becomes a float 0 / 1 matrix that SDPA adds to the scores: reproduced as CogView4's (its
    pipeline passes none). The KV cache of condition images (image-to-image): the forwards that write it
    (mode "write": condition image, no text) are not steps; a forward that reads it (keys = [cached condition
    tokens, text, image], queries = [text, image]: not one joint sequence) is refused. Mode "skip" (the
    unconditional forward) and no cache (text-to-image) are captured."""

    family = "glm_image"
    cfg_batched = False  # GlmImagePipeline: the unconditional forward after the conditional one

    @classmethod
    def transformer_classes(cls):
        from diffusers import GlmImageTransformer2DModel

        return (GlmImageTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor

        return (GlmImageAttnProcessor,)

    @staticmethod
    def _cache_mode(bound: dict):
        kv_caches = bound.get("kv_caches")
        return None if kv_caches is None else (kv_caches[0].mode, len(kv_caches[0].k_caches))

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        mode = cls._cache_mode(bound)
        if mode is not None and mode[0] == "read" and mode[1]:
            raise ValueError(
                "capture on GlmImageTransformer2DModel: this forward reads the KV cache of condition images "
                "(image-to-image): the keys are [cached condition tokens, text, image] and the queries [text, image], "
                "not one joint sequence; capture supports text-to-image (no cached condition images)"
            )
        text_len, grid, batch_size = super().read_forward(transformer, bound)
        return (None if cls.skip_forward(bound) else text_len), grid, batch_size

    @classmethod
    def skip_forward(cls, bound: dict) -> bool:
        mode = cls._cache_mode(bound)
        return mode is not None and mode[0] == "write"  # encoding a condition image (no text): not a step


def _joyimage_layers(transformer) -> List[LayerSpec]:
    return [LayerSpec(f"double_blocks.{i}", b.attn, "joint") for i, b in enumerate(transformer.double_blocks)]


class JoyImageAdapter(DispatchAdapter):
    """``JoyImageEditTransformer3DModel``: ``double_blocks.{i}.attn`` (``JoyImageAttnProcessor``, no mask) over
    ``[image, text]``. The latent is ``[B, C, T, H, W]`` or, for editing, ``[B, items, C, T, H, W]`` with the
    generated item last: the transformer moves it first, so the image tokens are ``[generated, references]`` and
    the grid is one item's ``(T / p_t, H / p_h, W / p_w)`` (``(h, w)`` for one frame); the store keeps its rows.
    The pipelines pad the text with zeros and pass no mask (the padding takes part, as in the model)."""

    family = "joyimage"
    cfg_batched = False  # JoyImageEditPipeline: the negative prompt's forward after the positive one
    text_at = "end"
    layers = staticmethod(_joyimage_layers)

    @classmethod
    def transformer_classes(cls):
        from diffusers import JoyImageEditTransformer3DModel

        return (JoyImageEditTransformer3DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_joyimage import JoyImageAttnProcessor

        return (JoyImageAttnProcessor,)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, T, H, W] or [B, items, C, T, H, W]
        p_t, p_h, p_w = transformer.config.patch_size
        t, h, w = hidden_states.shape[-3:]
        grid = _image_grid(t // p_t, h // p_h, w // p_w)
        return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


class JoyImageEditPlusAdapter(JoyImageAdapter):
    """``JoyImageEditPlusTransformer3DModel``: as JoyImage (``JoyImageEditPlusAttnProcessor``), the image part a
    padded sequence of patches ``[generated, references, padding]`` with per-sample ``shape_list`` (the generated
    image first). ``encoder_hidden_states_mask`` ``[B, T]`` gives the boolean key mask ``[B, 1, 1, N]`` of the
    padded image patches and text: captured. The grid is the generated image's (the same in every sample)."""

    family = "joyimage_edit_plus"
    cfg_batched = True  # JoyImageEditPlusPipeline batches [uncond, cond] in one forward

    @classmethod
    def transformer_classes(cls):
        from diffusers import JoyImageEditPlusTransformer3DModel

        return (JoyImageEditPlusTransformer3DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_joyimage_edit_plus import JoyImageEditPlusAttnProcessor

        return (JoyImageEditPlusAttnProcessor,)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, max patches, C, p_t, p_h, p_w]
        shape_list = bound.get("shape_list")  # per sample [(t, h, w) of the generated image, of each reference]
        generated = {tuple(int(x) for x in shapes[0]) for shapes in shape_list or ()}
        if len(generated) > 1:
            raise ValueError(
                f"capture on JoyImageEditPlusTransformer3DModel: the generated images of the batch have different "
                f"grids {sorted(generated)}; one grid per forward is supported"
            )
        grid = _image_grid(*generated.pop()) if generated else None
        return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


class ZImageAdapter(DispatchAdapter):
    """``ZImageTransformer2DModel`` (basic mode, ``x`` a list of latents ``[C, F, H, W]``): ``layers.{i}.attention``
    (``ZSingleStreamAttnProcessor``) over one sequence per sample, ``[image, caption]``, each part padded with
    learnt pad tokens to a multiple of 32 (``SEQ_MULTI_OF``; the pad tokens take part in attention, as in the
    model), the samples then padded to the longest with a boolean key mask ``[B, N]`` (captured). With every image
    of the batch of one size, the image part has the same length in every sample, so the captions start at the
    same position: the text block is the end of the sequence, ``max_b(padded caption length)`` tokens (a shorter
    caption's tail is masked). Grid: the image's ``(H / p, W / p)`` (``patch_size``, ``f_patch_size`` of the call);
    the store keeps its rows (not the image pad tokens). Refused: images of different sizes in one batch, and omni
    mode (``x`` nested lists: ``[caption, condition images, generated image, SigLIP]``, the generated image not
    first). The noise and context refiners see image resp. text tokens only."""

    family = "z_image"
    # ZImagePipeline batches [cond, uncond] (conditional FIRST) and drops the second half on truncated-CFG steps:
    # batch="cond" keeps every row; pass batch=[0, ..] for the conditional rows
    cfg_batched = False
    text_at = "end"

    @classmethod
    def transformer_classes(cls):
        from diffusers import ZImageTransformer2DModel

        return (ZImageTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

        return (ZSingleStreamAttnProcessor,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"layers.{i}", b.attention, "single") for i, b in enumerate(transformer.layers)]

    @classmethod
    def not_capturable(cls, transformer):
        names = {f"noise_refiner.{i}": "image tokens only" for i in range(len(transformer.noise_refiner))}
        names.update({f"context_refiner.{i}": "caption tokens only" for i in range(len(transformer.context_refiner))})
        return {name: f"a refiner block of Z-Image: its attention sees {what} (no text-image attention)"
                for name, what in names.items()}

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        import inspect

        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

        images, captions = bound["x"], bound["cap_feats"]  # lists of [C, F, H, W] and [L_b, D]
        if isinstance(images[0], list):
            raise ValueError(
                "capture on ZImageTransformer2DModel: omni mode (x a list of lists) puts the generated image after "
                "the condition images and before the SigLIP tokens, not a [generated image, ...] block; capture "
                "supports the basic mode (one latent per sample)"
            )
        defaults = inspect.signature(type(transformer).forward).parameters
        p = bound.get("patch_size", defaults["patch_size"].default)
        p_f = bound.get("f_patch_size", defaults["f_patch_size"].default)
        sizes = {tuple(x.shape[-3:]) for x in images}
        if len(sizes) > 1:
            raise ValueError(
                f"capture on ZImageTransformer2DModel: the images of the batch have different sizes {sorted(sizes)} "
                "[F, H, W]: their captions would start at different positions; one size per forward is supported"
            )
        f, h, w = sizes.pop()
        text_len = max(-(-len(c) // SEQ_MULTI_OF) * SEQ_MULTI_OF for c in captions)  # padded caption tokens
        return text_len, _image_grid(f // p_f, h // p, w // p), len(images)
