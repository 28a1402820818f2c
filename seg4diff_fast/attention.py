"""``joint_attention``: joint (MM-DiT) attention that also returns its text-image probabilities.

One call computes ``out = softmax(q k^T * scale) v`` over the whole joint sequence (what
``F.scaled_dot_product_attention`` returns, no mask, no dropout) and the probabilities of the text-image
sub-blocks, normalised over ALL joint keys:

- ``i2t[b, (h,) i, j] = P[b, h, img_i, txt_j]``   image queries x text keys
- ``t2i[b, (h,) j, i] = P[b, h, txt_j, img_i]``   text queries x image keys

The text tokens are one contiguous block ``text_slice`` at the start (Flux order ``[text, image]``) or the
end (SD3 order ``[image, text]``) of the sequence; every other position is an image token, in sequence order,
so rows of ``i2t`` reshape row-major onto the latent patch grid.

Backends:

- ``"triton"``: the fused kernel in ``seg4diff_fast.kernels`` (CUDA, or Triton's interpreter when
  ``TRITON_INTERPRET=1``): one launch, the ``N x N`` matrix never exists. The interpreter has no bfloat16
  arithmetic: there bfloat16 inputs run through the kernel as float32 copies, ``out`` is cast back.
- ``"torch"``: pure PyTorch: SDPA's fused kernel gives ``out`` and each row's log-sum-exp, then only the
  image x text score blocks are recomputed, chunked over query rows (no ``N x N`` matrix).
- ``"reference"``: the explicit full softmax of ``seg4diff_fast.reference`` (O(N^2) memory).
- ``"auto"``: triton for CUDA tensors, torch otherwise.

The whole computation is the torch custom op ``torch.ops.seg4diff_fast.joint_attention``, so
``torch.compile`` keeps it in one graph. ``out`` is differentiable (the backward recomputes attention through
SDPA); the maps are not: they are returned detached, with no gradient. On every backend ``out`` has the strides
of ``torch.empty_like(q)``, as the op's fake implementation promises (inductor checks it).

Non-finite inputs: every backend returns NaN exactly where the float64 reference does (a query row with a
NaN or +inf logit, or only -inf logits, is NaN in ``out`` and the maps; a NaN key poisons every row of its head).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .reference import image_positions, reference_joint_attention

__all__ = ["joint_attention", "AttentionMaps", "resolve_text_slice", "CAPTURES", "HEADS", "BACKENDS"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CAPTURES = ("i2t", "t2i", "both", None)
HEADS = ("mean", "all")
BACKENDS = ("auto", "triton", "torch", "reference")
MAX_HEAD_DIM = 256
# The torch backend holds at most this many bytes of float32 scores at a time.
_TORCH_CHUNK_BYTES = 256 * 2**20


@dataclass
class AttentionMaps:
    """Text-image attention probabilities from :func:`joint_attention`.

    ``i2t``: ``[B, N_img, T]`` (``heads="mean"``) or ``[B, H, N_img, T]`` (``heads="all"``), image queries x
    text keys. ``t2i``: ``[B, T, N_img]`` or ``[B, H, T, N_img]``, text queries x image keys. ``None`` when not
    captured. Both are normalised over all joint keys, so a row of ``i2t`` sums to the share of attention the
    image token gives to the text (at most 1), not to 1. No gradient flows through them.
    """

    i2t: Optional[torch.Tensor] = None
    t2i: Optional[torch.Tensor] = None


def resolve_text_slice(text_slice: Union[slice, Sequence[int]], n: int) -> Tuple[int, int]:
    """Check ``text_slice`` against a joint sequence of ``n`` tokens and return ``(text_start, text_stop)``.

    Accepts a ``slice`` without step or a ``(start, stop)`` pair of non-negative ints. The block must be
    non-empty, inside the sequence, touch its start or its end, and leave at least one image token.
    """
    if isinstance(text_slice, slice):
        if text_slice.step not in (None, 1):
            raise ValueError(f"text_slice must have no step, got step={text_slice.step}")
        start, stop = text_slice.start, text_slice.stop
        start = 0 if start is None else start
        stop = n if stop is None else stop
    elif isinstance(text_slice, (tuple, list)) and len(text_slice) == 2:
        start, stop = text_slice
    else:
        raise TypeError(f"text_slice must be a slice or a (start, stop) pair, got {text_slice!r}")
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"text_slice {name} must be an int, got {type(value).__name__}")
    if not 0 <= start < stop <= n:
        raise ValueError(
            f"text_slice=({start}, {stop}) must be a non-empty range inside the joint sequence of {n} tokens "
            "(0 <= start < stop <= N)"
        )
    if start != 0 and stop != n:
        raise ValueError(
            f"text_slice=({start}, {stop}) must touch the start (Flux order [text, image]) or the end "
            f"(SD3 order [image, text]) of the joint sequence of {n} tokens"
        )
    if stop - start == n:
        raise ValueError(f"text_slice=({start}, {stop}) covers the whole sequence: there are no image tokens")
    return start, stop


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(
                f"{name} must have unit stride in its last (head) dimension, got strides {tuple(t.stride())}; "
                "call .contiguous() first"
            )
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have the same shape [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if q.numel() == 0:
        raise ValueError(f"q, k and v must not be empty, got shape {tuple(q.shape)}")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} is not supported: expected 1 <= D <= {MAX_HEAD_DIM}")


def _check_text_index(text_index, n_text: int, device: torch.device) -> Optional[torch.Tensor]:
    if text_index is None:
        return None
    if not isinstance(text_index, torch.Tensor):
        raise TypeError(f"text_index must be a 1-D integer tensor or None, got {type(text_index).__name__}")
    if text_index.dtype.is_floating_point or text_index.dtype.is_complex or text_index.dtype == torch.bool:
        raise TypeError(f"text_index must have an integer dtype, got {text_index.dtype}")
    if text_index.dim() != 1:
        raise ValueError(f"text_index must be 1-D, got shape {tuple(text_index.shape)}")
    if text_index.numel() == 0:
        raise ValueError("text_index must select at least one text column, got an empty tensor")
    if text_index.device != device:
        raise ValueError(f"text_index must be on the device of q ({device}), got {text_index.device}")
    if torch.compiler.is_compiling():
        # A graph being traced cannot read values (that would break it): the range is asserted when it runs.
        torch._assert_async(
            ((text_index >= 0) & (text_index < n_text)).all(),
            f"text_index values must be positions inside the text block, 0 <= i < {n_text}",
        )
        return text_index.long()
    lo, hi = int(text_index.min()), int(text_index.max())
    if lo < 0 or hi >= n_text:
        raise ValueError(
            f"text_index values must be positions inside the text block, 0 <= i < {n_text}; got range [{lo}, {hi}]"
        )
    return text_index.long()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 before "
                "importing seg4diff_fast to run the kernel through Triton's interpreter on the CPU, or use "
                "backend='torch'"
            )
    return backend


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_slice: Union[slice, Sequence[int]],
    *,
    capture: Optional[str] = "i2t",
    heads: str = "mean",
    text_index: Optional[torch.Tensor] = None,
    map_dtype: torch.dtype = torch.float16,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, AttentionMaps]:
    """Joint attention over ``[B, H, N, D]`` q, k, v, returning ``(out, AttentionMaps)``.

    Args:
        q, k, v: ``[B, H, N, D]``, same shape, dtype (float16, bfloat16, float32) and device; any strides with
            unit stride in the last dimension (a transposed ``[B, N, H, D]`` view works without a copy).
        text_slice: the text block of the joint sequence, a ``slice`` or a ``(start, stop)`` pair; it must
            touch the start (``[text, image]``) or the end (``[image, text]``) of the sequence.
        capture: ``"i2t"`` (image queries x text keys), ``"t2i"``, ``"both"`` or ``None`` (plain attention).
        heads: ``"mean"`` averages the maps over heads (in float32, converted once), ``"all"`` keeps them.
        text_index: optional 1-D integer tensor on q's device: the text columns to keep, as positions inside
            the text block (repeats allowed). ``T = len(text_index)``, else the text length.
        map_dtype: float16 (default; fine from 6e-8 up, subnormal below 6e-5), bfloat16 or float32.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"`` (see the module docstring).

    Returns:
        ``out`` (like ``q``: ``[B, H, N, D]``, same dtype and device, the strides of ``torch.empty_like(q)``)
        and :class:`AttentionMaps` with ``i2t`` ``[B, (H,) N_img, T]`` and ``t2i`` ``[B, (H,) T, N_img]`` in
        ``map_dtype`` (``None`` if not captured).
    """
    _check_qkv(q, k, v)
    n = q.shape[2]
    text_start, text_stop = resolve_text_slice(text_slice, n)
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
    if map_dtype not in DTYPES:
        raise ValueError(f"map_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {map_dtype!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    text_index = _check_text_index(text_index, text_stop - text_start, q.device)
    backend = _resolve_backend(backend, q.device)

    # Triton's interpreter has no bfloat16 arithmetic (tl.dot on bf16 returns garbage, max error ~1e9): there
    # the kernel runs on float32 copies of q, k, v and out is cast back to bfloat16 (its strides kept); the maps
    # are written in map_dtype as always. On CUDA the kernel takes bf16 as it is.
    upcast = q.dtype == torch.bfloat16 and backend not in ("torch", "reference") and _interpreting()
    if upcast:
        q, k, v = q.float(), k.float(), v.float()

    capture_i2t = capture in ("i2t", "both")
    capture_t2i = capture in ("t2i", "both")
    # The kernel takes unique text columns; repeated ones are gathered from its result afterwards. The torch and
    # reference backends gather any columns, and skip this data-dependent step (a graph break under torch.compile).
    expand = None
    if text_index is not None and backend not in ("torch", "reference"):
        unique, inverse = torch.unique(text_index, return_inverse=True)
        if unique.numel() != text_index.numel():
            text_index, expand = unique, inverse

    out, i2t, t2i = torch.ops.seg4diff_fast.joint_attention(
        q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads == "mean", text_index, map_dtype,
        float(scale), backend,
    )
    if upcast:
        out = out.to(torch.bfloat16)
    i2t = i2t if capture_i2t else None
    t2i = t2i if capture_t2i else None
    if expand is not None:
        i2t = None if i2t is None else i2t[..., expand]
        t2i = None if t2i is None else t2i[..., expand, :]
    return out, AttentionMaps(i2t=i2t, t2i=t2i)


# --------------------------------------------------------------------------------------------------------
# The custom op. Arguments are already checked; text_index is None or unique positions in the text block.
# Maps that are not captured come back as empty tensors (a custom op cannot return None).


def _map_shapes(q, text_start, text_stop, heads_mean, text_index):
    b, h, n, _ = q.shape
    n_img = n - (text_stop - text_start)
    t = text_stop - text_start if text_index is None else text_index.shape[0]
    lead = (b,) if heads_mean else (b, h)
    return lead + (n_img, t), lead + (t, n_img)


@torch.library.custom_op("seg4diff_fast::joint_attention", mutates_args=())
def _joint_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_start: int,
    text_stop: int,
    capture_i2t: bool,
    capture_t2i: bool,
    heads_mean: bool,
    text_index: Optional[torch.Tensor],
    map_dtype: torch.dtype,
    scale: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from .kernels import joint_attention_fwd

        out, i2t, t2i = joint_attention_fwd(
            q, k, v, text_start, text_stop, capture_i2t=capture_i2t, capture_t2i=capture_t2i,
            heads_mean=heads_mean, text_index=text_index, map_dtype=map_dtype, scale=scale,
        )
    elif backend == "torch":
        out, i2t, t2i = _torch_backend(
            q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype, scale
        )
    else:
        capture = {(True, True): "both", (True, False): "i2t", (False, True): "t2i"}.get((capture_i2t, capture_t2i))
        out, i2t, t2i = reference_joint_attention(
            q, k, v, text_start, text_stop, capture=capture, heads="mean" if heads_mean else "all",
            text_index=text_index, scale=scale, compute_dtype=None,
        )
        out = out.to(q.dtype)
        i2t = None if i2t is None else i2t.to(map_dtype)
        t2i = None if t2i is None else t2i.to(map_dtype)
    # Two distinct empty tensors: outputs of a custom op may not alias each other.
    def empty():
        return q.new_empty(0, dtype=map_dtype)

    return _strided_like(out, q), empty() if i2t is None else i2t, empty() if t2i is None else t2i


def _strided_like(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` ``[B, H, N, D]`` with the strides of ``torch.empty_like(q)``: the op's contract on every backend,
    promised by its fake implementation (``torch.compile`` with inductor checks real strides against the fake
    ones). For Flux's transposed ``[B, N, H, D]`` views that is the ``[B, N, H, D]`` memory order, for a
    contiguous or non-dense q the contiguous one. A backend that returns another layout costs one copy here.
    """
    want = torch.empty_like(q, device="meta").stride()  # no memory: only the strides empty_like would give
    if out.stride() == want:
        return out
    return torch.empty_like(q).copy_(out)


@_joint_attention_op.register_fake
def _(q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype, scale, backend):
    i2t_shape, t2i_shape = _map_shapes(q, text_start, text_stop, heads_mean, text_index)
    return (
        torch.empty_like(q),  # the strides _strided_like gives the real outputs
        q.new_empty(i2t_shape if capture_i2t else (0,), dtype=map_dtype),
        q.new_empty(t2i_shape if capture_t2i else (0,), dtype=map_dtype),
    )


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.scale = inputs[10]
    ctx.save_for_backward(q, k, v)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_out, grad_i2t, grad_t2i):
    # Recompute the attention through SDPA and differentiate that: the maps carry no gradient.
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q_, k_, v_, scale=ctx.scale)
        dq, dk, dv = torch.autograd.grad(out, (q_, k_, v_), grad_out)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_joint_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# The torch backend.


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """SDPA's output ``[B, H, N, D]`` and each query row's log-sum-exp ``[B, H, N]`` (natural log, float32), from
    one fused SDPA kernel: flash on the CPU; flash (fp16/bf16) or memory-efficient on CUDA. ``None`` where no
    such kernel takes these inputs (other devices, or a torch without these private ops).
    """
    try:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]
            return out, lse
        if q.device.type == "cuda":
            if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
                try:
                    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
                    return res[0], res[1]
                except RuntimeError:  # e.g. a GPU without flash attention: try the efficient kernel
                    pass
            res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)
            return res[0], res[1][..., : q.shape[-2]]  # this kernel pads lse to a multiple of 32
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return None


def _chunk_rows(b: int, h: int, width: int) -> int:
    """Query rows per chunk so that one chunk of ``[B, H, rows, width]`` float32 scores fits the budget."""
    return max(1, _TORCH_CHUNK_BYTES // (b * h * max(width, 1) * 4))


def _torch_backend(q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype, scale):
    """Pure-PyTorch joint attention with capture. Returns ``(out [B, H, N, D], i2t or None, t2i or None)``.

    ``out`` and each row's log-sum-exp come from one fused SDPA kernel (:func:`sdpa_with_lse`); where none
    gives the lse, ``out`` is SDPA's and the lse of the rows that need a map is computed over chunks of query
    rows x N keys. The maps are then ``exp(q k^T * scale - lse)`` over just the image x text blocks, in
    float32, a chunk of rows at a time (at most ``_TORCH_CHUNK_BYTES`` of scores): no ``N x N`` matrix.
    """
    b, h, n, _ = q.shape
    text_cols = torch.arange(text_start, text_stop, device=q.device)
    if text_index is not None:
        text_cols = text_cols[text_index]  # [T] sequence positions of the kept text columns
    img_cols = image_positions(n, text_start, text_stop, device=q.device)  # [N_img]

    # A query row with a non-finite entry is NaN in the joint softmax (each of its logits is +-inf or NaN, so the
    # row holds inf - inf, 0/0 or NaN), as the reference and the kernel give it; SDPA's fused CPU kernel returns
    # zeros (and lse 0) for a row whose logits are all -inf, like a masked row. poison [B, H, N]: 0 for finite
    # rows, NaN for the others; one pass over q.
    poison = (q - q).sum(dim=-1, dtype=torch.float32)
    fused = sdpa_with_lse(q, k, v, scale) if capture_i2t or capture_t2i else None
    if fused is not None:
        out, lse = fused
        lse = lse + poison
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        if not (capture_i2t or capture_t2i):
            return out.add_(poison[..., None].to(out.dtype)), None, None
        lse = q.new_empty(b, h, n, dtype=torch.float32)  # filled below for the rows that need a map
        kt = k.float().transpose(-1, -2)  # [B, H, D, N]
        rows = [img_cols] if capture_i2t else []
        rows += [text_cols] if capture_t2i else []
        pos = torch.cat(rows)
        step = _chunk_rows(b, h, n)
        for r in range(0, pos.numel(), step):
            p = pos[r:r + step]
            lse[:, :, p] = torch.logsumexp(torch.matmul(q[:, :, p].float() * scale, kt), dim=-1)

    def block_maps(query_pos, key_pos):
        """``exp(s - lse)`` of the given query rows x key columns, ``[B, (H,) len(query_pos), len(key_pos)]``
        in map_dtype, one chunk of rows at a time."""
        kt = k[:, :, key_pos].float().transpose(-1, -2)  # [B, H, D, K]
        shape = (b,) + (() if heads_mean else (h,)) + (query_pos.numel(), key_pos.numel())
        result = q.new_empty(shape, dtype=map_dtype)
        step = _chunk_rows(b, h, key_pos.numel())
        for r in range(0, query_pos.numel(), step):
            p = query_pos[r:r + step]
            row_lse = lse[:, :, p, None]  # [B, H, rows, 1]
            probs = torch.matmul(q[:, :, p].float() * scale, kt).sub_(row_lse).exp_()
            # A row whose lse is not finite (a +inf or NaN logit, or every logit -inf) is NaN in the joint
            # softmax, as in the reference and the kernel; exp(s - inf) alone would give finite zeros there.
            probs.add_(row_lse - row_lse)  # 0 where lse is finite, NaN elsewhere
            result[..., r:r + p.numel(), :] = probs.mean(dim=1) if heads_mean else probs
        return result

    out.add_(poison[..., None].to(out.dtype))
    i2t = block_maps(img_cols, text_cols) if capture_i2t else None
    t2i = block_maps(text_cols, img_cols) if capture_t2i else None
    return out, i2t, t2i
