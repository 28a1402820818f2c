"""Per-family defaults of the Seg4Diff protocol, from the paper's public code (cvlab-kaist/Seg4Diff).

Every field can be overridden through ``Segmenter(..., **overrides)`` or ``Protocol.replace(...)``.

SD3-medium (the paper's main model, all facts from its code, see DESIGN.md section 4):
  expert layer ``transformer_blocks.9``; ``text_encoder_3=None`` so the text block is 77 CLIP tokens + 77 zero
  vectors; 28-step flow-matching schedule, the clean latent (VAE posterior mean, shift and scale) noised once
  with ``scheduler.scale_noise`` at ``timesteps[-8]``; one transformer forward, no CFG; the image resized to
  1024x1024; maps from the CLIP columns, heads averaged; class map = mean of its token columns; bilinear
  upsampling; argmax.
SD3.5-medium: same code path (SD35Backbone). The paper's scripts leave the layer as a variable; we default to
  block 9 as for SD3 (not verified against their table).
Flux.1-dev: T5 tokens are the text block (``max_sequence_length = tokenizer_max_length = 77`` in their code),
  class columns start at position 0 (T5 has no BOS), distilled guidance 3.5, timestep ``timesteps[-8]`` of a
  28-step schedule with the resolution-dependent shift. Their scripts leave the layer as a variable; the
  paper counts double-stream blocks 0-18 and single-stream blocks as 19 + index. Our default, double-stream
  block 18 (the last joint block), is a choice, not a value from their table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

__all__ = ["Protocol", "PROTOCOLS", "protocol_for", "family_of", "ProtocolError", "check_protocol"]

LayerSpec = Union[int, str]


@dataclass(frozen=True)
class Protocol:
    family: str  # "sd3" or "flux": which adapter runs the forward
    layers: Tuple[LayerSpec, ...]  # expert layer(s); maps of several layers are averaged
    num_inference_steps: int = 28  # schedule the noise level is read from
    timestep_index: int = -8  # t = timesteps[timestep_index]
    size: Optional[int] = 1024  # working size (square resize, the paper); None: the input's own size
    resize: str = "square"  # "square" (paper) | "aspect" (keep aspect, ~size^2 pixels) | "pad"
    tokenizer: str = "tokenizer"  # pipeline attribute whose tokens are the captured text columns
    max_sequence_length: int = 77  # text columns read (CLIP 77; Flux: T5 length used in the paper)
    guidance: Optional[float] = None  # Flux distilled guidance; None for SD3
    drop_t5: bool = True  # SD3: load without text_encoder_3 (77 zero tokens instead of T5)
    seed: int = 0  # noise seed (per image: the same noise for every prompt of an image)
    combine: str = "raw"  # how class scores from several prompts are put together: "raw" | "minmax"
    max_classes_per_prompt: Optional[int] = None  # None: as many as fit in max_sequence_length
    prompt_batch: int = 8  # prompts of one image run together in one transformer batch ...
    tokens_per_batch: int = 65536  # ... as long as the batch holds at most this many image tokens
    generate_steps: int = 28
    generate_guidance_scale: float = 7.0

    def replace(self, **kw) -> "Protocol":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown protocol settings {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None or k in ("size", "guidance")})


PROTOCOLS = {
    "sd3": Protocol(family="sd3", layers=(9,)),
    "sd3.5": Protocol(family="sd3", layers=(9,)),
    "flux": Protocol(family="flux", layers=(18,), tokenizer="tokenizer_2", guidance=3.5, drop_t5=False,
                     generate_guidance_scale=3.5),
}


def family_of(pipe_or_name) -> str:
    """``"sd3"``, ``"sd3.5"`` or ``"flux"`` from a pipeline object or a model id."""
    name = pipe_or_name if isinstance(pipe_or_name, str) else type(pipe_or_name).__name__
    low = name.lower()
    if "flux" in low:
        return "flux"
    if "3.5" in low or "3-5" in low or "35" in low:
        return "sd3.5"
    if "3" in low and ("stable" in low or "sd" in low):
        return "sd3"
    raise ValueError(f"cannot tell the model family of {name!r}; pass family='sd3', 'sd3.5' or 'flux'")


def protocol_for(pipe_or_name, family: Optional[str] = None) -> Protocol:
    fam = family or family_of(pipe_or_name)
    if fam not in PROTOCOLS:
        raise ValueError(f"family must be one of {sorted(PROTOCOLS)}, not {fam!r}")
    p = PROTOCOLS[fam]
    # a tiny pipeline cannot hold layer 9 / 18: its default is its middle block
    tf = getattr(pipe_or_name, "transformer", None)
    if tf is not None:
        n = len(getattr(tf, "transformer_blocks", []))
        if fam == "flux":
            n += len(getattr(tf, "single_transformer_blocks", []))
        if n and all(isinstance(l, int) and l >= n for l in p.layers):
            p = p.replace(layers=(n // 2,))
    return p


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
    if p.family not in ("sd3", "flux"):
        raise ProtocolError("family", f"must be 'sd3' or 'flux', not {p.family!r}")
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
    if p.resize not in ("square", "aspect", "pad"):
        raise ProtocolError("resize", f"must be 'square', 'aspect' or 'pad', not {p.resize!r}")
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
    return p
