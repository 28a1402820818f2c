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

__all__ = ["reference_joint_attention", "full_map_attention", "image_positions"]


def image_positions(n: int, text_start: int, text_stop: int, device=None) -> torch.Tensor:
    """Sequence positions of the image tokens (every position outside ``[text_start, text_stop)``), in order.

    Returns a ``[n - (text_stop - text_start)]`` int64 tensor.
    """
    pos = torch.arange(n, device=device)
    return torch.cat([pos[:text_start], pos[text_stop:]])


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
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Joint attention through the explicit full softmax.

    Args:
        q, k, v: ``[B, H, N, D]`` tensors (any strides).
        text_start, text_stop: the text tokens are positions ``[text_start, text_stop)`` of the joint sequence;
            every other position is an image token.
        capture: ``"i2t"``, ``"t2i"``, ``"both"`` or ``None``.
        heads: ``"all"`` keeps the head axis of the maps, ``"mean"`` averages over it.
        text_index: optional 1-D integer tensor of text columns to keep (positions inside the text block).
        scale: softmax scale, default ``D ** -0.5``.
        compute_dtype: dtype of the whole computation (float64 for tests); ``None`` keeps ``q.dtype``,
            which is what Seg4Diff's code does in the model's dtype.

    Returns:
        ``(out, i2t, t2i)`` in ``compute_dtype``: ``out`` ``[B, H, N, D]``; ``i2t`` ``[B, (H,) N_img, T]``
        with ``i2t[b, h, i, j] = P[b, h, img_i, txt_j]``; ``t2i`` ``[B, (H,) T, N_img]`` with
        ``t2i[b, h, j, i] = P[b, h, txt_j, img_i]``, P being the softmax over all N keys. Maps not captured
        are ``None``.
    """
    dtype = q.dtype if compute_dtype is None else compute_dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    n, d = q.shape[-2], q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)  # [B, H, N, N]
    out = torch.matmul(p, v)

    txt = torch.arange(text_start, text_stop, device=q.device)
    if text_index is not None:
        txt = txt[text_index.to(device=q.device, dtype=torch.long)]
    img = image_positions(n, text_start, text_stop, device=q.device)

    i2t = t2i = None
    if capture in ("i2t", "both"):
        i2t = p[:, :, img][:, :, :, txt]  # [B, H, N_img, T]
    if capture in ("t2i", "both"):
        t2i = p[:, :, txt][:, :, :, img]  # [B, H, T, N_img]
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
