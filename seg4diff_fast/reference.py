"""The plain PyTorch oracle for joint attention with text-image capture.

This is what Seg4Diff's own code computes: the whole ``[B, H, N, N]`` softmax of the joint sequence,
then its text-image sub-blocks. It is the single reference of the project: tests compare every backend
with it (in float64), benchmarks time it as "the full-map path", and the docs define the maps by it.

It needs O(H * N^2) memory: use it on small inputs, or to measure what the fused kernel saves.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["reference_joint_attention", "full_map_attention", "image_positions", "masked_softmax", "additive_key_bias",
           "drop_masked_keys", "NORMALIZATIONS", "OUT_TOL", "MAP_TOL"]

# How the captured text-image blocks are normalised (see reference_joint_attention).
NORMALIZATIONS = ("joint", "text", "logits")

# Tolerances of every backend against this reference in float64, as (atol, rtol): |got - ref| <= atol + rtol |ref|.
# OUT_TOL by the inputs' dtype, MAP_TOL by the maps' dtype (map_dtype). The tests and `seg4diff-fast check` use them.
# out: fp32 accumulation; fp16/bf16 round p to the input dtype before the PV dot and round out once.
# maps: p = exp2(s - lse) is computed in fp32 (relative error ~1e-6), then rounded to map_dtype:
#   fp16 half-ulp 4.9e-4 relative, subnormal spacing 6e-8 below 6e-5; bf16 half-ulp 3.9e-3 relative.
# Measured max errors in the interpreter (CPU, the tests' small shapes, q*2 so the softmax is peaked):
#   out fp16: abs 9.8e-4 (values up to ~3; rel ~5e-4)      out fp32: abs 3.1e-6
#   maps fp32: abs 5.9e-7 (inputs fp16 or fp32)              maps fp16: abs 2.4e-4 (rel <= 4.9e-4)
#   maps bf16: abs 3.4e-3 (rel <= 3.9e-3)
# One-off check (not in the suite, 137 s in the interpreter): SD3 size N = 4096 + 154, d = 16, fp16 in,
#   fp16 maps, head mean, 77 columns: out 4.8e-4, i2t 3.0e-5, t2i 6.3e-5 abs, within MAP_TOL.
OUT_TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2), torch.float32: (2e-5, 2e-5)}
MAP_TOL = {torch.float16: (1e-7, 1e-3), torch.bfloat16: (1e-7, 8e-3), torch.float32: (1e-6, 1e-4)}

_LOG2E = 1.4426950408889634  # log2(e): the kernels' softmax runs in base 2 (exp(x) = exp2(x * log2 e))


def additive_key_bias(key_mask: torch.Tensor) -> torch.Tensor:
    """The additive key bias ``[B, N]`` float32 that a key mask stands for, in the project's canonical form (what
    every backend and this reference use): a boolean mask (True = the key takes part) gives 0 / ``-inf``; a float
    mask is taken as float32 (SDPA's additive semantics: added to the scaled scores), and every value whose
    base-2 form ``bias * log2(e)`` overflows float32 (below about -2.36e38, e.g. ``torch.finfo(torch.float32).min``
    or a float64 ``-1e300``) becomes ``-inf``: a masked key, probability exactly 0. (SDPA gives such a key
    ``exp(finfo.min + s - max) = 0`` too, as long as the row has a key with a finite, ordinary bias; a row whose
    keys are all masked is 0 here, where SDPA would average over the ``finfo.min`` keys.) NaN and ``+inf`` stay
    as they are (the rows that see them are NaN, as in SDPA)."""
    if key_mask.dtype == torch.bool:
        return torch.zeros(key_mask.shape, dtype=torch.float32, device=key_mask.device).masked_fill_(
            ~key_mask, float("-inf"))
    bias = key_mask.to(torch.float32)
    return bias.masked_fill(bias * _LOG2E == float("-inf"), float("-inf"))


def drop_masked_keys(k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)`` ``[B, H, N, D]`` with the rows of masked keys (``bias[b, j] == -inf``, ``bias`` ``[B, N]`` in the
    form of :func:`additive_key_bias`) set to 0: a masked key takes no part, so whatever its k and v rows hold (NaN,
    inf: padding is often uninitialised) never reaches the result (``0 * NaN`` would be NaN in ``P V``, and a NaN
    score NaN in the row's max). Differentiable (the masked rows get gradient 0); new tensors, the strides kept."""
    masked = (bias == float("-inf"))[:, None, :, None]  # [B, 1, N, 1]
    return k.masked_fill(masked, 0.0), v.masked_fill(masked, 0.0)


def image_positions(n: int, text_start: int, text_stop: int, device=None) -> torch.Tensor:
    """Sequence positions of the image tokens (every position outside ``[text_start, text_stop)``), in order.

    Returns a ``[n - (text_stop - text_start)]`` int64 tensor.
    """
    pos = torch.arange(n, device=device)
    return torch.cat([pos[:text_start], pos[text_stop:]])


def masked_softmax(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last dim of ``x`` restricted to the ``valid`` entries (bool, broadcastable to ``x``):
    invalid entries get exactly 0 and take no part in the normaliser. A row with no valid entry is all 0, as
    torch's SDPA (its math path's safe softmax) gives for a fully masked row, and its gradient is 0, not NaN
    (the row is filled with finite values before the softmax, then zeroed). ``valid=None``: plain softmax."""
    if valid is None:
        return torch.softmax(x, dim=-1)
    dead = ~valid.any(dim=-1, keepdim=True)  # rows with no valid entry
    x = x.masked_fill(~valid, float("-inf")).masked_fill(dead, 0.0)
    return torch.softmax(x, dim=-1).masked_fill(dead, 0.0)


def reference_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_start: int,
    text_stop: int,
    *,
    capture: Optional[str] = "both",
    heads: str = "all",
    text_index: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
    normalize: str = "joint",
    key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Joint attention through the explicit full softmax.

    It is differentiable end to end (plain torch ops): autograd through it in float64 is the gradient
    oracle of the maps, and, in the model's dtype, the paper's full-matrix training path.

    Normalisations of the maps (``normalize``), with S = q k^T * scale the ``[B, H, N, N]`` scaled scores:

    - ``"joint"``: P = softmax(S) over all N keys, the model's own probabilities (the default).
    - ``"text"``: the softmax restricted to the captured block's key columns: each ``i2t`` row (an image
      query) over the kept text keys only (the paper's "softmax over the text tokens"), each ``t2i`` row (a
      kept text query) over the image keys only. Rows sum to 1. With ``text_index`` the softmax runs over
      the SET of selected text tokens: a repeated column is a copy of the same value, counted once in the
      normaliser.
    - ``"logits"``: S itself on the block (pre-softmax scores, what the paper's training uses), the key bias
      included (``S + bias``; masked columns 0).

    ``heads="mean"`` averages the normalised per-head maps.

    Key mask (``key_mask`` bool ``[B, N]``, True = the key takes part; or float ``[B, N]``, an additive key bias,
    SDPA's convention, in the canonical form of :func:`additive_key_bias`): the bias is added to S before every
    softmax (the joint one, and the block softmax of ``"text"``) and to the ``"logits"``; masked keys (bias
    ``-inf``, a False of a bool mask) get probability 0 and take no part in any normaliser (their k and v rows are
    never read: NaN or inf there changes nothing, :func:`drop_masked_keys`); every map column of
    a masked key is exactly 0, in every normalisation (``"logits"`` too). Queries are not masked: a masked
    token's own row attends to the valid keys, as SDPA with a key padding mask does. A softmax row with no
    valid key (every key of the sample masked; for ``"text"``, every key of the block) is 0, as SDPA gives.

    Args:
        q, k, v: ``[B, H, N, D]`` tensors (any strides).
        text_start, text_stop: the text tokens are positions ``[text_start, text_stop)`` of the joint sequence;
            every other position is an image token.
        capture: ``"i2t"``, ``"t2i"``, ``"both"`` or ``None``.
        heads: ``"all"`` keeps the head axis of the maps, ``"mean"`` averages over it.
        text_index: optional 1-D integer tensor of text columns to keep (positions inside the text block;
            repeats allowed).
        scale: softmax scale, default ``D ** -0.5``.
        compute_dtype: dtype of the whole computation (float64 for tests); ``None`` keeps ``q.dtype``,
            which is what Seg4Diff's code does in the model's dtype.
        normalize: ``"joint"``, ``"text"`` or ``"logits"`` (see above).
        key_mask: None, a bool ``[B, N]`` (or ``[1, N]``) tensor, True where the key takes part, or a float one
            (an additive key bias; see above).

    Returns:
        ``(out, i2t, t2i)`` in ``compute_dtype``: ``out`` ``[B, H, N, D]``; ``i2t`` ``[B, (H,) N_img, T]``
        with ``i2t[b, h, i, j] = P[b, h, img_i, txt_j]``; ``t2i`` ``[B, (H,) T, N_img]`` with
        ``t2i[b, h, j, i] = P[b, h, txt_j, img_i]``, P being the softmax over all N keys (``"joint"``; the
        other normalisations replace P as described above). Maps not captured are ``None``.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    dtype = q.dtype if compute_dtype is None else compute_dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    n, d = q.shape[-2], q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    bias = None
    if key_mask is not None:
        bias = additive_key_bias(key_mask.to(q.device)).expand(q.shape[0], n)  # [B, N] float32
        k, v = drop_masked_keys(k, v, bias)  # a masked key's k and v are never read
        bias = bias.to(dtype)[:, None, None, :]  # [B, 1, 1, N]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, N, N]
    valid = None
    if bias is not None:
        valid = bias != float("-inf")  # NaN counts as unmasked: it poisons its rows, as in SDPA
        s = s + bias
    p = masked_softmax(s, valid)  # [B, H, N, N]
    out = torch.matmul(p, v)

    # Unique kept text positions [T_u] and, for each output column, its place among them [T].
    txt = torch.arange(text_start, text_stop, device=q.device)
    expand = slice(None)
    if text_index is not None:
        unique, expand = torch.unique(text_index.to(device=q.device, dtype=torch.long), return_inverse=True)
        txt = txt[unique]
    img = image_positions(n, text_start, text_stop, device=q.device)
    blocks = p if normalize == "joint" else s
    if normalize == "logits" and valid is not None:
        blocks = blocks.masked_fill(~valid, 0.0)  # masked key columns are 0

    def block_valid(cols):  # [B, 1, 1, C] validity of the block's key columns, or None
        return None if valid is None else valid[..., cols]

    i2t = t2i = None
    if capture in ("i2t", "both"):
        i2t = blocks[:, :, img][:, :, :, txt]  # [B, H, N_img, T_u]
        i2t = masked_softmax(i2t, block_valid(txt)) if normalize == "text" else i2t
        i2t = i2t[..., expand]  # [B, H, N_img, T]
    if capture in ("t2i", "both"):
        t2i = blocks[:, :, txt][:, :, :, img]  # [B, H, T_u, N_img]
        t2i = masked_softmax(t2i, block_valid(img)) if normalize == "text" else t2i
        t2i = t2i[..., expand, :]  # [B, H, T, N_img]
    if heads == "mean":
        i2t = None if i2t is None else i2t.mean(dim=1)
        t2i = None if t2i is None else t2i.mean(dim=1)
    return out, i2t, t2i


def full_map_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_start: int,
    text_stop: int,
    *,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seg4Diff's own path, for benchmarks: the explicit ``[B, H, N, N]`` softmax in the model's dtype, whose
    image-query x text-key block is averaged over heads, then attention a second time through SDPA for the
    block's output.

    Returns ``(out [B, H, N, D], i2t [B, N_img, N_txt])``, both in ``q.dtype``.
    """
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    img = image_positions(q.shape[-2], text_start, text_stop, device=q.device)
    i2t = p[:, :, img, text_start:text_stop].mean(dim=1)
    del p
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out, i2t
