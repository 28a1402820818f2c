"""The record of one model family (:class:`Family`) and the one adapter that reads it.

A family's module in this folder holds its records (``FAMILIES``): the transformer and processor classes by import
path (resolved when first used), its attention layers as patterns (``"transformer_blocks.{i}.attn"``: the layer is
``transformer_blocks.<i>``, its attention module the full path), where the text sits in the joint sequence, how its
pipelines batch CFG, the few lines that read the text length and the image grid from a forward, and, where a family
truly differs, the code that says how (a token order, image-only queries, a processor of its own). Everything else
(the store, the batch and step policy, the kernel call, the interception of the processor's attention call) is
shared: :mod:`~seg4diff_fast.capture.base`, :mod:`~seg4diff_fast.capture.dispatch`,
:mod:`~seg4diff_fast.capture.handle`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..base import CaptureSite, LayerSpec, check_old_processor
from ..dispatch import InterceptingProcessor, intercepting_processor

__all__ = ["Family", "Layers", "Segment", "Tiny", "MIDDLE", "resolve", "latent_grid", "video_grid", "image_grid",
           "read_latent", "ReorderingSite", "template_start_idx", "count_template_start"]


def resolve(path: str):
    """The object an import path names: ``"diffusers.FluxTransformer2DModel"``,
    ``"diffusers.models.transformers.transformer_flux.FluxAttnProcessor"``."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Layers:
    """One kind of capturable layer: ``pattern`` ``"<blocks>.{i}.<attention>"`` (``<blocks>`` a module list of the
    transformer, ``<attention>`` the attention module's path inside a block: ``"attn"``, ``"block.attn1"``); the layer
    is named ``<blocks>.<i>``. ``kind``: ``"joint"`` (the text comes as ``encoder_hidden_states``) or ``"single"`` (the
    text is in the sequence already). ``skip_last``: the name of a transformer attribute, that many last blocks are not
    capturable (Motif-Video's decoder blocks)."""

    pattern: str
    kind: str = "joint"
    skip_last: Optional[str] = None

    def __post_init__(self):
        if ".{i}." not in self.pattern or self.kind not in ("joint", "single"):
            raise ValueError(f"Layers: pattern must read '<blocks>.{{i}}.<attention>' and kind be 'joint' or 'single', "
                             f"got {self.pattern!r}, {self.kind!r}")

    @property
    def blocks(self) -> str:
        return self.pattern.split(".{i}")[0]

    def specs(self, transformer) -> List[LayerSpec]:
        attention = self.pattern.split(".{i}.")[1]
        blocks = list(transformer.get_submodule(self.blocks))
        blocks = blocks[: len(blocks) - self.skipped(transformer)]
        return [LayerSpec(f"{self.blocks}.{i}", b.get_submodule(attention), self.kind) for i, b in enumerate(blocks)]

    def skipped(self, transformer) -> int:
        return 0 if self.skip_last is None else getattr(transformer, self.skip_last)


#: ``Segment.layer``: the middle joint block, ``n // 2`` of the transformer's ``n`` joint blocks (our default for the
#: families the Seg4Diff paper did not evaluate; :func:`seg4diff_fast.segmentation.protocol.resolve_middle`)
MIDDLE = "middle"


@dataclass(frozen=True, eq=False)
class Tiny:
    """A tiny random-weight pipeline of the family, built offline by the one builder
    :func:`seg4diff_fast.segmentation.tiny.tiny_pipeline`.

    - ``pipeline``: the diffusers pipeline class name.
    - ``transformer``: the transformer's config (its class is the record's first ``transformers`` entry); keyword
      arguments of ``tiny_pipeline`` override it (``num_layers=1``, ``patch_size=1``).
    - ``parts``: ``parts(max_length) -> {component: object}``, what else the pipeline takes (text encoders, tokenizers,
      a guider, ``None`` for a component left out): the family's code, next to its record.
    - ``vae``: keyword arguments of the builder's small ``AutoencoderKL`` (``latent_channels``, ``blocks``), or
      ``vae() -> VAE`` for a family with a VAE of its own.
    - ``scheduler``: ``(class name, config)``.
    - ``max_length``: the default text length handed to ``parts`` and ``after`` (``tiny_pipeline(max_length=...)``).
    - ``after``: ``after(pipe, max_length)``, pipeline attributes to set once built (a template head counted by the
      stand-in tokenizer, a text length).
    - ``order``: the order ``"parts"``, ``"vae"`` and ``"transformer"`` are built in after ``torch.manual_seed(seed)``
      (it draws their random weights: kept as the family's builder had it, so the weights are the same).
    """

    pipeline: str
    transformer: Mapping[str, object]
    parts: Callable
    vae: Union[Mapping[str, object], Callable] = field(default_factory=dict)
    scheduler: Tuple[str, Mapping[str, object]] = ("FlowMatchEulerDiscreteScheduler", {})
    max_length: Optional[int] = None
    after: Optional[Callable] = None
    order: Tuple[str, str, str] = ("parts", "transformer", "vae")

    def __post_init__(self):
        if sorted(self.order) != ["parts", "transformer", "vae"]:
            raise ValueError(f"Tiny: order must be 'parts', 'transformer' and 'vae' in some order, got {self.order!r}")

    def but(self, **transformer) -> "Tiny":
        """This pipeline with ``transformer`` config overrides (a variant: SD3.5, CogVideoX 1.5)."""
        from dataclasses import replace

        return replace(self, transformer={**self.transformer, **transformer})


def template_start_idx(pipe, tokenizer) -> int:
    """``Segment.text_head`` of the pipelines that say it as ``prompt_template_encode_start_idx`` (Qwen-Image,
    HunyuanImage, HunyuanVideo 1.5)."""
    return int(pipe.prompt_template_encode_start_idx)


def count_template_start(pipe, max_length=None):
    """A ``Tiny.after``: ``prompt_template_encode_start_idx`` counted by the pipeline's stand-in tokenizer on the head
    of its ``prompt_template_encode`` (the real value is the real tokenizer's count)."""
    head = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(head)["input_ids"])


@dataclass(frozen=True, eq=False)
class Segment:
    """What Seg4Diff segmentation knows of a family: data, and the family's code where it truly differs (functions
    of the family's module, next to its record). The one description that reads it:
    :class:`seg4diff_fast.segmentation.families.SegFamily` (resolved when segmentation starts, never by capture); the
    protocol these values fill: :class:`~seg4diff_fast.segmentation.protocol.Protocol`, whose module docstring says
    where each value comes from.

    - ``pipelines``: the diffusers pipeline class names of the family (``family_of`` of a pipeline).
    - ``model_ids``: lower-case substrings of a model id that name the family (``family_of`` of a model id: the
      longest substring found wins, ties in record order).
    - ``name_of``: ``name_of(lower-case name) -> protocol key or None``, the family's own rule for a name no
      ``model_ids`` substring claims (SD3: the version in the name), tried in record order.
    - ``layer``: the default expert layer, a layer index or :data:`MIDDLE` (the default: ours, for the families the
      paper did not evaluate).
    - ``paper``: the defaults are the Seg4Diff paper's (its public code); False: ours, not tuned.
    - ``settings``: the other ``Protocol`` fields where the family's defaults differ from ``Protocol``'s.
    - ``variants``: more protocol keys of the family, ``{key: settings}`` on top of ``settings`` (SD3.5).
    - ``models``: the models, for the README's table (default: the record's ``title``).
    - ``columns``: which text columns the maps read, in words, for docs/03-segmentation.md's table.
    - ``batch_prompts``: prompts of one image may share a forward (fixed-length text); False: one prompt per forward
      (variable-length text: Qwen-Image's chat template, CogView4's GLM).
    - ``loader``: the diffusers pipeline class ``load_pipeline`` loads a model id with; None: the one the model's
      ``model_index.json`` names (``DiffusionPipeline``). ``load_without``: components it loads as None (SD3's T5:
      the paper runs SD3 without it). ``dtype``: the dtype it loads the model in on a GPU (the released one).
    - ``tiny``: the family's tiny random-weight pipelines, ``{name: Tiny}`` (:class:`Tiny`); ``name`` is
      ``tiny_pipeline``'s, and ``tiny-<name>`` (``_`` as ``-``) the ``--model`` name; its protocol is ``name`` where
      that is one of the family's protocol keys (``sd3.5``), else the family's.

    How a forward is built (the names are the description's, :mod:`seg4diff_fast.segmentation.families`):

    - ``packed``: latents packed 2x2 into one token (Flux-style): pixels per token side = VAE scale x 2 (else x
      the transformer's ``patch_size``).
    - ``latents``: the clean latent's normalisation, ``"shift_scale"``, ``"scale"``, ``"video"``, or
      ``latents(pipe, x) -> z``.
    - ``schedule``: ``"pipeline"``, ``"token_shift"``, or ``schedule(pipe, sched, z, protocol) -> timesteps``.
    - ``noise``: ``"flow"`` (``scale_noise``) or ``"ddpm"`` (``add_noise``).
    - ``encode``: ``encode(pipe, prompts, protocol, device) -> dict``, the forward's text arguments (required).
    - ``forward``: ``forward(pipe, lat, t, enc, protocol)``, one conditional transformer forward; None:
      ``transformer(hidden_states=lat, timestep=t, **enc)``.
    - ``text_layout``: ``text_layout(pipe, tokenizer, prompt, spans, protocol) -> (columns, text length)``; None: a
      fixed-length block whose prompt starts at column 0.
    - ``text_head``: ``text_head(pipe, tokenizer) -> int``, how many of the tokens the column text encoder is given
      precede the transformer's text block (the chat template's head the pipeline drops: ``text_layout``'s columns
      count from there); None: 0. :func:`template_start_idx`: diffusers' ``prompt_template_encode_start_idx``.
    - ``max_side``: ``max_side(pipe, patch) -> pixels``; None: ``pos_embed_max_size`` patches (or no limit).
    - ``generate_tokens``: ``generate`` passes ``max_sequence_length`` (this by default) to the pipeline; None: not.
    - ``generate``: ``generate(pipe, kwargs) -> kwargs``, the pipeline call's keyword arguments, last edit.
    - ``generate_size_error``: ``generate_size_error(pipe, height, width) -> why or None``.
    """

    pipelines: Tuple[str, ...]
    layer: Union[int, str] = MIDDLE
    paper: bool = False
    model_ids: Tuple[str, ...] = ()
    name_of: Optional[Callable] = None
    settings: Mapping[str, object] = field(default_factory=dict)
    variants: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    models: str = ""
    columns: str = ""
    batch_prompts: bool = True
    loader: Optional[str] = None
    load_without: Tuple[str, ...] = ()
    dtype: str = "bfloat16"
    tiny: Mapping[str, Tiny] = field(default_factory=dict)
    packed: bool = False
    latents: Union[str, Callable] = "shift_scale"
    schedule: Union[str, Callable] = "pipeline"
    noise: str = "flow"
    encode: Optional[Callable] = None
    forward: Optional[Callable] = None
    text_layout: Optional[Callable] = None
    text_head: Optional[Callable] = None
    max_side: Optional[Callable] = None
    generate_tokens: Optional[int] = None
    generate: Optional[Callable] = None
    generate_size_error: Optional[Callable] = None

    def __post_init__(self):
        if not (isinstance(self.layer, int) or self.layer == MIDDLE):
            raise ValueError(f"Segment: layer must be a layer index or {MIDDLE!r}, got {self.layer!r}")


@dataclass(frozen=True)
class Family:
    """What capture knows of one family (see the module docstring). The adapter interface that
    :mod:`~seg4diff_fast.capture.handle` calls: :meth:`transformer_classes`, :meth:`layers`, :meth:`not_capturable`,
    :meth:`index_to_name`, :meth:`make_processor`, :meth:`read_forward`, :meth:`skip_forward`, ``family``,
    ``cfg_batched``.

    - ``family``: its name (``Protocol.family``, ``analysis``); ``title``: the models, for the tables.
    - ``transformers``: import paths of the transformer classes.
    - ``processors``: import paths of the default processor classes capture stands in for (every layer);
      ``single_processors``: those of the ``"single"`` layers where they differ.
    - ``blocks``: the :class:`Layers` in block order (integer ``i`` names the ``i``-th layer of all of them).
    - ``text_at``: ``"start"`` (``[text, image]``) or ``"end"`` (``[image, text]``) of the joint sequence the attention
      sees; ``text``: what the text block holds, for the tables.
    - ``cfg_batched``: the family's pipelines batch ``[uncond, cond]`` in one forward (``batch="cond"`` keeps the
      second half).
    - ``read``: ``read(transformer, bound) -> (text_len, grid, batch_size)`` from the forward's arguments by name;
      ``grid`` ints (``(h, w)``, video ``(frames, h, w)``) or Flux-style position ids ``[N_img, C]``; ``grid_text``:
      how, for the tables.
    - ``skip``: ``skip(bound) -> bool``, a forward that is not a step (SD3's skip-layer-guidance pass).
    - ``refused``: ``refused(transformer) -> {layer: why}``, attention layers that exist but carry no text-image
      attention (SD3.5's ``attn2``, refiner blocks).
    - ``reorder``: the token order the layer's attention runs in, :class:`ReorderingSite`'s ``order``.
    - ``image_queries``: the attention's queries are the image tokens only (:mod:`.image_queries`).
    - ``processor``: ``processor(spec, site, old) -> capture processor``: a family with a capture processor of its
      own (SD3); None: the layer's processor intercepted at its attention call (:mod:`~seg4diff_fast.capture.dispatch`).
    - ``video``: a video family (grid ``(frames, h, w)``), for the tables.
    - ``segment``: what Seg4Diff segmentation knows of it (:class:`Segment`); None: capture only.
    """

    family: str
    title: str
    transformers: Tuple[str, ...]
    processors: Tuple[str, ...]
    blocks: Tuple[Layers, ...]
    text_at: str
    cfg_batched: bool
    read: Callable
    grid_text: str
    text: str = ""
    single_processors: Tuple[str, ...] = ()
    skip: Optional[Callable] = None
    refused: Optional[Callable] = None
    reorder: Optional[Callable] = None
    image_queries: bool = False
    processor: Optional[Callable] = None
    video: bool = False
    segment: Optional[Segment] = None

    def __post_init__(self):
        if self.text_at not in ("start", "end"):
            raise ValueError(f"family {self.family!r}: text_at must be 'start' or 'end', not {self.text_at!r}")

    # -- the adapter interface
    def transformer_classes(self) -> Tuple[type, ...]:
        return tuple(resolve(p) for p in self.transformers)

    def processor_classes(self, spec: LayerSpec) -> Tuple[type, ...]:
        """The default processor classes of ``spec``'s layer, the only ones capture stands in for."""
        paths = self.single_processors if spec.kind == "single" and self.single_processors else self.processors
        return tuple(resolve(p) for p in paths)

    def layers(self, transformer) -> List[LayerSpec]:
        """Every capturable attention layer, in block order."""
        return [spec for kind in self.blocks for spec in kind.specs(transformer)]

    def not_capturable(self, transformer) -> Dict[str, str]:
        """``{name: why}`` for attention layers that exist but carry no text."""
        return {} if self.refused is None else self.refused(transformer)

    def index_to_name(self, transformer, index: int) -> str:
        """The layer an integer names (``register`` checked ``0 <= index < len(layers)``)."""
        return self.layers(transformer)[index].name

    def make_processor(self, spec: LayerSpec, site: CaptureSite, old):
        """A capture processor for ``spec`` replacing ``old``; raises if ``old`` is a processor we do not replicate
        (IP-adapter, KV-cache ...). An intercepting processor is made from the processor it was itself made from."""
        if self.processor is not None:
            return self.processor(spec, site, old)
        if self.image_queries and site.store.capture != "i2t":
            raise ValueError(
                f"layer {spec.name!r} of {self.family}: its attention has image queries only (the text tokens are "
                f"keys and values, never queries), so there are no t2i maps; register with capture='i2t' "
                f"(got {site.store.capture!r})"
            )
        original = old._capture_original if isinstance(old, InterceptingProcessor) else old
        check_old_processor(spec, original, self.processor_classes(spec))
        if self.reorder is not None:
            site = ReorderingSite(site, self.reorder)
        wrap = None
        if self.image_queries:
            from .image_queries import image_queries_call as wrap
        return intercepting_processor(original, site, self.text_at, wrap)

    def read_forward(self, transformer, bound: dict) -> Tuple[Optional[int], object, int]:
        """From the transformer's forward arguments (by name): ``(text_len, grid, batch_size)``."""
        return self.read(transformer, bound)

    def skip_forward(self, bound: dict) -> bool:
        """Whether this forward is not a step."""
        return False if self.skip is None else self.skip(bound)

    def __repr__(self) -> str:
        return f"Family({self.family!r})"


# ---------------------------------------------------------------------------------------- grids of many families
def latent_grid(transformer, hidden_states: torch.Tensor) -> Tuple[int, int]:
    """``(H / p, W / p)``: the image-token grid of a latent ``[B, C, H, W]`` (or ``[..., H, W]``) patchified by
    ``transformer.config.patch_size`` (patches row-major)."""
    p = transformer.config.patch_size
    return hidden_states.shape[-2] // p, hidden_states.shape[-1] // p


def video_grid(transformer, hidden_states: torch.Tensor) -> Tuple[int, int, int]:
    """``(frames, h, w)`` of a ``[B, C, F, H, W]`` latent patchified by ``patch_size_t`` x ``patch_size``^2 (a
    config without ``patch_size_t``: no temporal patch, EasyAnimate and Mochi)."""
    p, p_t = transformer.config.patch_size, getattr(transformer.config, "patch_size_t", None) or 1
    return (hidden_states.shape[2] // p_t, hidden_states.shape[3] // p, hidden_states.shape[4] // p)


def image_grid(frames: int, h: int, w: int):
    """``(h, w)`` for one frame (an image), else ``(frames, h, w)`` (Qwen-Image's convention)."""
    return (h, w) if frames == 1 else (frames, h, w)


def read_latent(transformer, bound: dict):
    """The most common forward: a latent ``hidden_states`` ``[B, C, H, W]`` and the text ``encoder_hidden_states``
    ``[B, T, D]``."""
    hidden_states = bound["hidden_states"]
    return bound["encoder_hidden_states"].shape[1], latent_grid(transformer, hidden_states), hidden_states.shape[0]


# ------------------------------------------------------------------------------------------- reordered sequences
def _gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, :, index[b, n]]``: ``t`` ``[B, H, N, D]`` (or ``[B, N]``), ``index`` ``[B, N]`` -> like ``t``."""
    if t.ndim == 2:
        return t.gather(1, index)
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


class ReorderingSite:
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
