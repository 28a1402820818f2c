"""Per-family defaults of the Seg4Diff protocol, from the paper's public code (cvlab-kaist/Seg4Diff).

Every field can be overridden through ``Segmenter(..., **overrides)`` or ``Protocol.replace(...)``. Where the
paper's text and its code disagree the defaults follow the code (it produced the tables); both are named here.

All families (``train_net.py``, detectron2's test-time DatasetMapper, ``seg4diff_model_ovss.py``):
  the image is resized so its shortest edge is 640 px (longest at most 2560: detectron2's ResizeShortestEdge,
  ``INPUT.MIN_SIZE_TEST 640`` / ``MAX_SIZE_TEST 2560``), then squashed (bilinear) to 1024x1024 (``resize="paper"``;
  the paper's A.1 says "center-cropped if non-square", the code crops nothing); the 64x64 maps are upsampled
  bilinearly straight to the input's size; fresh noise for every image (``randn_tensor`` without a generator):
  here a seed derived from ``seed`` and the image's key (:func:`image_seed`), reproducible and different per image.
SD3-medium (the paper's main model, see DESIGN.md section 4):
  expert layer ``transformer_blocks.9``; ``text_encoder_3=None`` and ``max_sequence_length=77`` so the text block
  is 77 CLIP tokens + 77 zero vectors; 28-step flow-matching schedule, the clean latent (VAE posterior mean of
  pixels in [-1, 1], shift and scale) noised once with ``scheduler.scale_noise`` at ``timesteps[-8]``; one
  transformer forward, no CFG; maps from the CLIP columns, heads averaged; class map = mean of its token columns;
  argmax. Generation (the paper's A.1): classifier-free guidance 7.5.
SD3.5-medium (SD35Backbone, same path): layer 9 (the paper's appendix C: "SD3.5 appears to have layer 9, identical
  to SD3"); its ``encode_prompt`` call passes no ``max_sequence_length``, so the T5 part is diffusers' default 256
  zero vectors (``t5_tokens=256``): 77 + 256 = 333 text tokens share the softmax.
Flux.1-dev (FluxBackbone): T5 tokens are the text block (``max_sequence_length = tokenizer_max_length = 77``),
  class columns start at position 0 (T5 has no BOS), distilled guidance 3.5. Layer: the appendix C names
  double-stream blocks 12 and 17 ("Flux shows layer 12 and 17 to have a similar tendency"); ``eval_flux.sh``
  leaves the layer as a variable; we default to 12, the first one named (``layers=(17,)`` or ``(12, 17)`` for the
  others). Noise level: their backbone builds a **50-step** schedule and computes the resolution-dependent shift
  from ``image_seq_len = shape[1]``, which is the latent's channel count (16), not its 4096 tokens: mu = 0.459 and
  ``timesteps[-8]`` is sigma ~ 0.23 at any resolution (``num_inference_steps=50``, ``shift_seq_len=16``). The
  principled value, the real token count (``shift_seq_len=None``), gives sigma ~ 0.38 for 50 steps at 1024^2 (0.56
  for 28 steps). Their ``image_to_latents`` encodes the pixels in [0, 1] without the ``2x - 1`` that SD3's does
  (``vae_pixels="unit"``); ``"signed"`` is what the VAE was trained on.
Flux.1 Kontext (``FluxKontextPipeline``): the Flux family and its defaults, run without a reference image.

Inference options of the official configs (``seg4diff/config.py``, ``configs/eval_*.yaml``), every family, defaults
as ``eval_ovss.yaml`` / ``eval_unsup.yaml`` run them: ``normalize`` (``MODEL.BACKBONE.SOFTMAX`` True: "joint";
``SOFTMAX_I2T_ONLY``: "text", a softmax over the read text columns only; ``SOFTMAX`` False: "logits", the scaled
scores), ``heads`` ("mean"; ``MAX_HEAD``: "max"; ``KEEP_HEAD``: "keep", the heads side by side as columns
``h * T + t``; ``MODEL.HEAD``: the head's index), ``norm_before_merge`` (``NORM_BEFORE_MERGE``: each token column
min-max normalised over the pixels before a class's columns are averaged; ``config.py`` says True, the eval config
False) and ``tta`` (``TEST.AUG.ENABLED``: detectron2's 9 shortest edges x flip, the scores averaged). Where each acts:
docs/03-segmentation.md, "Options of the official configs".

Families the paper did not evaluate (Qwen-Image, CogView4, CogVideoX, Chroma, HunyuanImage, HunyuanVideo, ...): the defaults are OURS, not the paper's,
and not tuned: the expert layer is the middle joint block (``layers=("middle",)``: index ``n // 2`` of the ``n``
``transformer_blocks``), the paper's SD3 noise level recipe (``timesteps[-8]`` of a 28-step schedule, built as the
family's pipeline builds it, shift from the image's real token count), the square 1024 working size
(CogVideoX: 50-step DDIM v-prediction schedule, ``timesteps[-8]``, working size 480, T5 length 226 of which the first
77 columns are read), 77 text tokens per prompt at most, pixels in [-1, 1], posterior mean.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

# ``layers=(MIDDLE,)``: the middle joint block, ``n // 2`` of the transformer's ``n`` ``transformer_blocks`` (HiDream:
# ``double_stream_blocks``; our default for the families the paper did not evaluate)
from ..capture.families.record import MIDDLE

__all__ = ["Protocol", "PROTOCOLS", "protocol_for", "family_of", "image_seed", "RESIZES", "ProtocolError",
           "check_protocol", "MIDDLE", "resolve_middle", "NORMALIZES", "HEAD_REDUCTIONS", "TTA_MIN_SIZES",
           "TTA_MAX_SIZE", "PIPELINE_FAMILIES", "MODEL_IDS"]


#: "paper": shortest edge 640 (longest at most 2560) then squashed to size x size, as the paper's code;
#: "square": squashed to size x size directly; "aspect": aspect kept at about size^2 pixels; "pad": long side to
#: size, padded to the patch multiple
RESIZES = ("paper", "square", "aspect", "pad")

LayerSpec = Union[int, str]

#: how the captured i2t block is normalised (the official ``MODEL.BACKBONE`` keys): "joint", the model's own softmax
#: over all keys (``SOFTMAX: True``, the default); "text", a softmax over the read text columns only
#: (``SOFTMAX_I2T_ONLY: True``: SD3's 77 CLIP columns); "logits", the scaled scores q.k / sqrt(d) (``SOFTMAX: False``)
NORMALIZES = ("joint", "text", "logits")
#: how the heads become one map (``Protocol.heads``; an int, one head, is the fourth choice): "mean" (the default),
#: "max" (``MAX_HEAD``), "keep" (``KEEP_HEAD``: the heads side by side, column ``h * T + t``)
HEAD_REDUCTIONS = ("mean", "max", "keep")
#: test-time augmentation (``TEST.AUG``, detectron2's defaults, which the official configs keep): every shortest
#: edge of TTA_MIN_SIZES (longest at most TTA_MAX_SIZE), each plain and flipped left-right: 18 forwards per image
TTA_MIN_SIZES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
TTA_MAX_SIZE = 4000


@dataclass(frozen=True)
class Protocol:
    family: str  # whose record the description reads: a key of families.SEG_FAMILIES ("sd3", "flux", ...)
    layers: Tuple[LayerSpec, ...]  # expert layer(s); maps of several layers are averaged
    num_inference_steps: int = 28  # schedule the noise level is read from
    timestep_index: int = -8  # t = timesteps[timestep_index]
    size: Optional[int] = 1024  # working size (square resize, the paper); None: the input's own size
    resize: str = "paper"  # one of RESIZES
    tokenizer: str = "tokenizer"  # pipeline attribute whose tokens are the captured text columns
    max_sequence_length: int = 77  # text columns read (CLIP 77; Flux: T5 length used in the paper)
    guidance: Optional[float] = None  # Flux distilled guidance; None for SD3
    drop_t5: bool = True  # SD3: load without text_encoder_3 (77 zero tokens instead of T5)
    seed: int = 0  # base noise seed; each image draws from image_seed(seed, its key), the same for all its prompts
    combine: str = "raw"  # how class scores from several prompts are put together: "raw" | "minmax"
    max_classes_per_prompt: Optional[int] = None  # None: as many as fit in max_sequence_length
    prompt_batch: int = 8  # prompts of one image run together in one transformer batch ...
    tokens_per_batch: int = 65536  # ... as long as the batch holds at most this many image tokens
    generate_steps: int = 28
    generate_guidance_scale: float = 7.5  # the paper's A.1 (CFG 7.5 for generation)
    shift_seq_len: Optional[int] = None  # Flux: sequence length fed to the timestep shift; None: the real one
    vae_pixels: str = "signed"  # pixels given to the VAE: "signed" [-1, 1] | "unit" [0, 1] (the paper's Flux code)
    # length of the padded text sequence the pipeline encodes: SD3 the T5 part (zero vectors without T5); CogVideoX,
    # HiDream: T5; Flux.2 [klein]: the chat-templated Qwen3 sequence
    t5_tokens: int = 77
    # the inference options of the official configs (docs/03-segmentation.md, "Options of the official configs")
    normalize: str = "joint"  # one of NORMALIZES (SOFTMAX / SOFTMAX_I2T_ONLY)
    heads: Union[str, int] = "mean"  # one of HEAD_REDUCTIONS, or a head index (MODEL.HEAD)
    norm_before_merge: bool = False  # each token column min-max normalised over the pixels (NORM_BEFORE_MERGE)
    tta: bool = False  # test-time augmentation: TTA_MIN_SIZES x flip, scores averaged (TEST.AUG.ENABLED)

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, not {self.resize!r}")
        if self.vae_pixels not in ("signed", "unit"):
            raise ValueError(f"vae_pixels must be 'signed' ([-1, 1]) or 'unit' ([0, 1]), not {self.vae_pixels!r}")
        if self.shift_seq_len is not None and (not isinstance(self.shift_seq_len, int) or self.shift_seq_len < 1):
            raise ValueError(f"shift_seq_len must be a positive int or None, not {self.shift_seq_len!r}")
        if not isinstance(self.t5_tokens, int) or self.t5_tokens < 1:
            raise ValueError(f"t5_tokens must be a positive int, not {self.t5_tokens!r}")

    def replace(self, **kw) -> "Protocol":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown protocol settings {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **{k: v for k, v in kw.items()
                                            if v is not None or k in ("size", "guidance", "shift_seq_len")})


def _from_records():
    """``(PROTOCOLS, PIPELINE_FAMILIES, MODEL_IDS)`` from the family records' ``segment`` (capture/families/):
    a record's protocol (its family's name; ``variants`` add more keys), its pipeline class names and model-id
    substrings. Two records that claim one key, pipeline or model id are refused (a record made by ``replace`` from
    another must say its own ``segment``)."""
    from ..capture.families import FAMILIES

    protocols, pipelines, model_ids = {}, {}, {}
    for record in FAMILIES:
        seg = record.segment
        if seg is None:
            continue
        base = dict(family=record.family, layers=(seg.layer,), **seg.settings)
        for key, settings in ((record.family, base), *((k, {**base, **v}) for k, v in seg.variants.items())):
            if key in protocols:
                raise RuntimeError(f"two family records give the segmentation protocol {key!r}")
            protocols[key] = Protocol(**settings)
        for table, names in ((pipelines, seg.pipelines), (model_ids, seg.model_ids)):
            for name in names:
                if name in table:
                    raise RuntimeError(f"{name!r} is claimed by the records {table[name]!r} and {record.family!r}")
                table[name] = record.family
    return protocols, pipelines, model_ids


#: protocol key -> the family's defaults (a record's family name, and its ``Segment.variants``: ``"sd3.5"``)
PROTOCOLS: Dict[str, Protocol]
#: pipeline class name -> protocol family; model-id substring (lower case) -> protocol family
PIPELINE_FAMILIES: Dict[str, str]
MODEL_IDS: Dict[str, str]
PROTOCOLS, PIPELINE_FAMILIES, MODEL_IDS = _from_records()


def image_seed(seed: int, key) -> int:
    """The noise seed of one image: a stable 63-bit hash of the base ``seed`` and the image's ``key`` (its dataset
    id, or its index in a list). Every image gets its own noise, as in the paper's code (which draws unseeded),
    yet a run is reproducible and independent of the order or sharding of the images."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def family_of(pipe_or_name) -> str:
    """A key of :data:`PROTOCOLS` (``"sd3"``, ``"sd3.5"``, ``"flux"``, ``"qwenimage"``, ...) from a pipeline object or a
    model id: the pipeline class a record names (unless the record has variants: StableDiffusion3Pipeline is SD3 or
    SD3.5), else the longest model-id substring of a record found in the name (ties: the first record's), else the
    first key a record's ``Segment.name_of`` gives (SD3 / SD3.5 by the name's version)."""
    from ..capture.families import FAMILIES, by_name

    name = pipe_or_name if isinstance(pipe_or_name, str) else type(pipe_or_name).__name__
    low = name.lower()
    if name in PIPELINE_FAMILIES and not by_name[PIPELINE_FAMILIES[name]].segment.variants:
        return PIPELINE_FAMILIES[name]
    found = sorted((key for key in MODEL_IDS if key in low), key=len, reverse=True)  # stable: ties in record order
    if found:
        return MODEL_IDS[found[0]]
    for record in FAMILIES:
        key = record.segment.name_of(low) if record.segment and record.segment.name_of else None
        if key is not None:
            return key
    raise ValueError(f"cannot tell the model family of {name!r}; pass family= one of {sorted(PROTOCOLS)}")


def protocol_for(pipe_or_name, family: Optional[str] = None) -> Protocol:
    fam = family or family_of(pipe_or_name)
    if fam not in PROTOCOLS:
        raise ValueError(f"family must be one of {sorted(PROTOCOLS)}, not {fam!r}")
    p = PROTOCOLS[fam]
    # a tiny pipeline cannot hold layer 9 / 18: its default is its middle block (of the blocks integer layers count:
    # every kind of the family record's blocks, Flux's double- then single-stream ones)
    tf = getattr(pipe_or_name, "transformer", None)
    if tf is not None:
        n = sum(len(getattr(tf, kind.blocks, None) or []) for kind in _record(p).blocks)
        if n and all(isinstance(l, int) and l >= n for l in p.layers):
            p = p.replace(layers=(n // 2,))
        p = resolve_middle(p, tf)
    return p


def _record(p: Protocol):
    """The family record of protocol ``p``."""
    from ..capture.families import by_name

    return by_name[p.family]


def resolve_middle(p: Protocol, transformer) -> Protocol:
    """``p`` with :data:`MIDDLE` in its layers replaced by the middle joint block's index."""
    if MIDDLE not in p.layers:
        return p
    # the joint (double-stream) blocks, the first kind of the family record's blocks (indices 0..n-1 first):
    # transformer_blocks (HiDream: double_stream_blocks)
    n = len(getattr(transformer, _record(p).blocks[0].blocks, None) or [])
    if not n:
        raise ProtocolError("layers", f"{type(transformer).__name__} has no joint blocks to take the middle of: "
                                      "name the layer")
    return p.replace(layers=tuple(n // 2 if l == MIDDLE else l for l in p.layers))


class ProtocolError(ValueError):
    """A setting that cannot work, raised before any compute. ``field``: the :class:`Protocol` field (or
    ``"image"``, ``"classes"``, ``"height"``, ``"width"``) at fault, so that the command line can name its flag."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_protocol(p: Protocol) -> Protocol:
    """Refuse settings that no model can run (each with a :class:`ProtocolError` naming the field); returns ``p``.
    What depends on the model (layer range, positional limit, patch size) is checked by the Segmenter."""
    from .families import SEG_FAMILIES

    if p.family not in SEG_FAMILIES:
        raise ProtocolError("family", f"must be one of {sorted(SEG_FAMILIES)}, not {p.family!r}")
    if not isinstance(p.layers, tuple) or not p.layers:
        raise ProtocolError("layers", f"give at least one layer, got {p.layers!r}")
    for layer in p.layers:
        if not (_is_int(layer) and layer >= 0) and not (isinstance(layer, str) and layer.strip()):
            raise ProtocolError("layers", f"a layer is an integer >= 0 or a module name, got {layer!r}")
    if not _is_int(p.num_inference_steps) or p.num_inference_steps < 1:
        raise ProtocolError("num_inference_steps", f"must be an integer >= 1, got {p.num_inference_steps!r}")
    n = p.num_inference_steps
    if not _is_int(p.timestep_index) or not -n <= p.timestep_index < n:
        raise ProtocolError("timestep_index", f"must be an integer in [{-n}, {n - 1}] for a {n}-step schedule, "
                                              f"got {p.timestep_index!r}")
    if p.size is not None and (not _is_int(p.size) or p.size < 1):
        raise ProtocolError("size", f"must be a number of pixels >= 1 or None (the input's own size), got {p.size!r}")
    if p.resize not in RESIZES:
        raise ProtocolError("resize", f"must be one of {RESIZES}, not {p.resize!r}")
    if not _is_int(p.seed) or not 0 <= p.seed < 2 ** 63:
        raise ProtocolError("seed", f"must be an integer in [0, 2**63), got {p.seed!r}")
    if p.combine not in ("raw", "minmax"):
        raise ProtocolError("combine", f"must be 'raw' or 'minmax', not {p.combine!r}")
    if p.max_classes_per_prompt is not None and (not _is_int(p.max_classes_per_prompt) or p.max_classes_per_prompt < 1):
        raise ProtocolError("max_classes_per_prompt", f"must be an integer >= 1 or None, got {p.max_classes_per_prompt!r}")
    for name in ("prompt_batch", "tokens_per_batch", "max_sequence_length", "generate_steps"):
        v = getattr(p, name)
        if not _is_int(v) or v < 1:
            raise ProtocolError(name, f"must be an integer >= 1, got {v!r}")
    if p.normalize not in NORMALIZES:
        raise ProtocolError("normalize", f"must be one of {NORMALIZES}, not {p.normalize!r}")
    if not (p.heads in HEAD_REDUCTIONS or (_is_int(p.heads) and p.heads >= 0)):
        raise ProtocolError("heads", f"must be one of {HEAD_REDUCTIONS} or a head index >= 0, not {p.heads!r}")
    if p.heads == "max" and p.normalize == "logits":  # the official processor asserts the same
        raise ProtocolError("heads", "'max' takes the largest probability over the heads: it needs normalize 'joint' "
                                     "or 'text', not 'logits' (the official code refuses MAX_HEAD without a softmax)")
    for name in ("norm_before_merge", "tta"):
        if not isinstance(getattr(p, name), bool):
            raise ProtocolError(name, f"must be True or False, got {getattr(p, name)!r}")
    if p.tta and (p.resize != "paper" or p.size is None):
        raise ProtocolError("tta", "test-time augmentation replaces the paper's shortest-edge-640 resize by each TTA "
                                   f"size: it needs resize 'paper' and a working size, not resize={p.resize!r}, "
                                   f"size={p.size!r}")
    return p
