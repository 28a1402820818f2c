"""Families captured through :mod:`seg4diff_fast.capture.dispatch` that need no code of their own beyond where
the text sits, its length and the image grid: CogView4, CogView3-Plus, HiDream, Qwen-Image, HunyuanImage,
Chroma, Ovis-Image and LongCat-Image (image), CogVideoX, ConsisID, HunyuanVideo and HunyuanVideo 1.5 (video).

- CogView4: ``CogView4Transformer2DModel``, ``transformer_blocks.{i}.attn1`` with ``CogView4AttnProcessor``
  (``F.scaled_dot_product_attention``), joint sequence ``[text, image]``, RoPE on the image part only. Its
  pipeline passes no attention mask; a forward given ``attention_mask`` is refused at the attention call (the
  processor turns it into a float 0 / 1 matrix that SDPA adds to the scores: a bias, not a key mask).
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

from typing import List

from .base import LayerSpec
from .dispatch import DispatchAdapter
from .flux import FluxAdapter

__all__ = [
    "CogView4Adapter", "CogView3PlusAdapter", "CogVideoXAdapter", "ConsisIDAdapter", "HiDreamAdapter", "QwenImageAdapter",
    "OvisImageAdapter", "LongCatImageAdapter", "HunyuanImageAdapter", "HunyuanVideoAdapter", "HunyuanVideo15Adapter",
    "ChromaAdapter",
]


class _BlocksAttn1(DispatchAdapter):
    """Families with one joint attention per block: ``transformer_blocks.{i}.attn1``, integer ``i``."""

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"transformer_blocks.{i}", b.attn1, "joint") for i, b in enumerate(transformer.transformer_blocks)]

    @classmethod
    def index_to_name(cls, transformer, index: int) -> str:
        return f"transformer_blocks.{index}"


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
        p = transformer.config.patch_size
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
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
        p = transformer.config.patch_size
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
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
    def index_to_name(cls, transformer, index: int) -> str:
        return f"transformer_blocks.{index}"

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
