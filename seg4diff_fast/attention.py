"""``joint_attention``: joint (MM-DiT) attention that also returns its text-image probabilities.

One call computes ``out = softmax(q k^T * scale) v`` over the whole joint sequence (what
``F.scaled_dot_product_attention`` returns, no dropout) and the probabilities of the text-image sub-blocks,
normalised over ALL joint keys:

- ``i2t[b, (h,) i, j] = P[b, h, img_i, txt_j]``   image queries x text keys
- ``t2i[b, (h,) j, i] = P[b, h, txt_j, img_i]``   text queries x image keys

The text tokens are one contiguous block ``text_slice`` at the start (Flux order ``[text, image]``) or the
end (SD3 order ``[image, text]``) of the sequence; every other position is an image token, in sequence order,
so rows of ``i2t`` reshape row-major onto the latent patch grid.

Two phases: attention (``out`` and each row's natural-log log-sum-exp) and capture (only the image x text
score blocks, recomputed from q, k and lse). Backends:

- ``"triton"``: the fused kernel in ``seg4diff_fast.kernels`` (CUDA, or Triton's interpreter when
  ``TRITON_INTERPRET=1``): both phases in one launch, the ``N x N`` matrix never exists.
- ``"triton-split"``: our attention kernel (TMA / warp-specialised on sm90) then our capture kernel.
- ``"sdpa"``: CUDA: torch's fastest SDPA kernel (cuDNN, flash or memory-efficient) for ``out``, then our capture
  kernel, which computes the captured rows' lse itself for ``"joint"`` maps (one pass over those rows x N keys):
  SDPA's lse rounds the scores differently from the capture kernel (see Accuracy below). On the CPU: SDPA's CPU
  flash kernel for ``out`` (a RuntimeError where no fused kernel takes the inputs), then the maps in torch (the
  torch backend's :func:`_torch_maps`): no Triton there, interpreter or not.

The interpreter has no bfloat16 arithmetic: there the backends that launch Triton kernels (``"triton"``,
``"triton-split"``; ``"sdpa"`` on CUDA only) take bfloat16 inputs as float32 copies; ``out`` is cast back.
- ``"torch"``: pure PyTorch: SDPA's fused kernel gives ``out``; the maps are recomputed chunked over query rows
  (no ``N x N`` matrix): ``"joint"`` maps as the block columns of each chunk's softmax over all N keys,
  ``"text"`` / ``"logits"`` from the image x text score blocks only.
- ``"reference"``: the explicit full softmax of ``seg4diff_fast.reference`` (O(N^2) memory), in float32 for
  float16 / bfloat16 inputs (their scores overflow or round off in the input dtype); ``out`` cast back.
- ``"full-map"``: Seg4Diff's own path, for benchmarks (``reference.full_map_attention``): the explicit
  ``[B, H, N, N]`` softmax in the input dtype, then SDPA again for ``out``. Only what Seg4Diff computes:
  ``capture="i2t"`` (or ``None``: SDPA alone), ``heads="mean"``, ``normalize="joint"``, every text column, no key
  mask; anything else is refused. The benchmarks' e2e "full-map" path captures through it.
- ``"auto"``: the fastest backend that passed ``seg4diff-fast check --save`` on this device for the dtype, head
  dim and capture mode (its table in the user's cache folder, ``seg4diff_fast.selfcheck``). Without one: CUDA:
  ``"triton"`` (``"torch"`` without the triton package). CPU: ``"sdpa"`` (SDPA's CPU flash kernel, then the capture in torch); it
  falls back to ``"torch"`` where torch lacks that kernel (``_scaled_dot_product_flash_attention_for_cpu``), and on
  other devices. A Triton backend that no saved table verified runs a small self-test against ``"torch"`` the first
  time per process; on a failure ``auto`` falls back (``"sdpa"``, then ``"torch"``) with one warning. A backend
  named explicitly never falls back.

Normalisations of the maps (``normalize``): ``"joint"`` (the softmax over all N keys, above), ``"text"``
(the softmax restricted to the block's key columns: i2t rows over the kept text keys, t2i rows over the
image keys) and ``"logits"`` (the scaled scores ``q k^T * scale`` of the block). ``seg4diff_fast.reference``
defines them exactly. ``"triton"`` writes joint maps in its fused kernel and the other two with the capture
kernel (``kernels/capture.py``), which needs no lse for them.

Key masks (``key_mask`` ``[B, N]``, SDPA's conventions): bool (True = the key takes part) or float, an additive
key bias: ``bias[b, j]`` is added to the scaled scores ``scale * q_i . k_j`` of every query row before the
softmax (``out`` is SDPA's with ``attn_mask=key_mask[:, None, None, :]``), ``-inf`` masks the key; a bool mask is
the bias 0 / ``-inf``. Inside, every backend takes the same float32 bias (``reference.additive_key_bias``): values
whose base-2 form ``bias * log2(e)`` overflows float32 (below about -2.36e38, e.g. ``torch.finfo(torch.float32).min``)
become ``-inf``, because the kernels' softmax runs in base 2. Masked keys get probability exactly 0 and their map
columns are exactly 0 in every normalisation; their rows of k and v are never read (``reference.drop_masked_keys``
zeroes them first: NaN or inf padding changes nothing); ``"text"`` normalises the biased block scores and
``"logits"`` maps are the scores the softmax sees, ``scale * q.k + bias`` (masked columns written as 0). Queries are
not masked. A
sample whose keys are all masked gets ``out`` 0 and maps 0 (SDPA's CPU result for a bool mask; for a float mask of
``finfo.min`` values SDPA would average over those keys instead) and zero gradients; its rows' lse is ``+inf``
inside (FlashAttention's convention: every probability recomputed from it is 0). A NaN bias (or ``+inf``) makes
the rows that see it NaN, as in SDPA (not checked: that would need a device sync). The bias gets no gradient
(a ``key_mask`` that requires grad is refused). The Triton kernels read the fp32 bias row behind a ``HAS_MASK``
compile-time flag; the ``"sdpa"`` and ``"torch"`` backends give it to the vendor kernel as its additive mask
(in q's dtype on CUDA, which its memory-efficient kernel requires).

Gradients (trainable maps): ``out`` is differentiable w.r.t. q, k, v (recomputed through SDPA, ``torch.func.vjp``)
and the maps w.r.t. q and k, in O(N * D + N_img * T) memory per head, never ``N x N``. With S the scaled
scores, M a map and G its incoming gradient:

- ``"logits"``: dS = G on the block; ``"text"``: dS_ik = M_ik (G_ik - sum_j G_ij M_ij) over the row's block
  columns. Both touch only the image x text block (O(N_img * T * D) work): chunked torch on every backend.
- ``"joint"``: M_ik = exp(S_ik - lse_i) and lse_i depends on every key of row i, so with
  c_i = sum_k G_ik M_ik over the row's captured columns, dS_il = P_il (G_il - c_i) for EVERY key l
  (G = 0 off the block). Rows of i2t (image queries) and t2i (text queries) are disjoint, so one c per row.
  The backends that launch Triton kernels run it as a flash-style kernel (``kernels/maps_backward.py``: tiled
  recompute from q, k); the others (``"sdpa"`` on the CPU too) as chunks of query rows x N keys in torch (at
  most ``_TORCH_CHUNK_BYTES`` of scores).
  With a key bias S includes it (a constant); P_il = 0 for a masked key l, so dS_il = 0 there; the maps'
  masked entries are constants.

Then dq = scale dS k and dk = scale dS^T q. The forward and the backward are two torch custom ops
(``torch.ops.seg4diff_fast.joint_attention`` and ``..._backward``), so ``torch.compile(fullgraph=True)``
keeps a training step in one graph. On every backend ``out`` has the strides of ``torch.empty_like(q)``, as
the op's fake implementation promises (inductor checks it).

Accuracy: every backend computes scores, probabilities and sums in float32 (``torch.autocast`` regions are left
for the call), at any ``scale``. A row's probabilities are exact up to the rounding of its float32 logits
``z = scale * q.k`` (about ``2^-24 * |z|`` each; the condition of a softmax entry is ``p (1 - p)``): a row whose
largest logit stands apart is one-hot to the last bit even at ``scale`` 1e10, as in float64. For that, each
"joint" map divides by a normaliser computed from the same rounded scores as its entries (the fused kernel's
own lse, the split kernel's base-2 lse handed over unconverted, the capture kernel's own lse for ``"sdpa"``, one
softmax per chunk in torch): an lse taken from another kernel, or rounded once more, is off by about
``2^-24 * |lse|``, which every map entry carries (1e-2 at ``scale`` 1e4, probabilities above 1 at 1e6, inf at
1e10: what the torch, sdpa and split backends gave before they took it so). On a GPU the attention loops (ours as
FlashAttention's and SDPA's) compute ``exp2(s * qk_scale - m)`` as one FMA, which leaves the rounding error of the
scaled row max in the largest entry (carried consistently by ``out`` and the lse); beyond ``|scale * q.k|`` of about
1e9 that exponent overflows, so GPU results there are not promised (not measured on a GPU yet).

Non-finite inputs: with ``normalize="joint"`` every backend returns NaN exactly where the float64 reference
does (a query row with a NaN or +inf logit, or only -inf logits, is NaN in ``out`` and the maps; a NaN key
poisons every row of its head). ``"text"`` and ``"logits"`` maps are what IEEE arithmetic gives on the block's
scores (a NaN score stays NaN), as in the reference; their ``out`` follows the joint rule.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .reference import (NORMALIZATIONS, additive_key_bias, drop_masked_keys, full_map_attention, image_positions,
                        masked_softmax, reference_joint_attention)
from .selfcheck import mode_key

__all__ = [
    "joint_attention", "AttentionMaps", "resolve_text_slice", "key_mask_from_lengths", "CAPTURES", "HEADS", "BACKENDS",
    "NORMALIZATIONS",
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CAPTURES = ("i2t", "t2i", "both", None)
HEADS = ("mean", "all")
BACKENDS = ("auto", "triton", "triton-split", "sdpa", "torch", "reference", "full-map")
MAX_HEAD_DIM = 256
# The torch paths hold at most this many bytes of float32 scores at a time; on the CPU at most _CPU_CHUNK_BYTES,
# a cache-sized chunk (the quick bench, 4 heads x 2048 image rows x 2202 keys: 85 ms and 7 MiB with 4 MiB chunks,
# 126 ms and 76 MiB with 256 MiB ones; measured on a loaded 2-core CPU, the ratio to full-map interleaved).
_TORCH_CHUNK_BYTES = 256 * 2**20
_CPU_CHUNK_BYTES = 4 * 2**20


@dataclass
class AttentionMaps:
    """Text-image attention probabilities from :func:`joint_attention`.

    ``i2t``: ``[B, N_img, T]`` (``heads="mean"``) or ``[B, H, N_img, T]`` (``heads="all"``), image queries x
    text keys. ``t2i``: ``[B, T, N_img]`` or ``[B, H, T, N_img]``, text queries x image keys. ``None`` when not
    captured. With ``normalize="joint"`` both are normalised over all joint keys, so a row of ``i2t`` sums to
    the share of attention the image token gives to the text (at most 1), not to 1. They carry gradients to
    q and k when those require grad.
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


def key_mask_from_lengths(
    text_lengths: torch.Tensor, n: int, text_slice: Union[slice, Sequence[int]]
) -> torch.Tensor:
    """The ``key_mask`` of samples whose text is padded: bool ``[B, N]`` on ``text_lengths``' device, True for
    every image key and for the first ``text_lengths[b]`` tokens of the text block ``text_slice`` of sample b
    (its valid prefix), False for the rest of the block (the padding).

    ``text_lengths``: 1-D integer tensor ``[B]``, each ``0 <= length <= text_stop - text_start`` (a length of
    0 masks the whole text block; the image keys stay valid). ``n``: the joint sequence length N.
    """
    if not isinstance(text_lengths, torch.Tensor):
        raise TypeError(f"text_lengths must be a 1-D integer tensor, got {type(text_lengths).__name__}")
    if text_lengths.dtype.is_floating_point or text_lengths.dtype.is_complex or text_lengths.dtype == torch.bool:
        raise TypeError(f"text_lengths must have an integer dtype, got {text_lengths.dtype}")
    if text_lengths.dim() != 1 or text_lengths.numel() == 0:
        raise ValueError(f"text_lengths must be 1-D [B] with B >= 1, got shape {tuple(text_lengths.shape)}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int (the joint sequence length), got {type(n).__name__}")
    text_start, text_stop = resolve_text_slice(text_slice, n)
    t_full = text_stop - text_start
    if not torch.compiler.is_compiling():
        lo, hi = int(text_lengths.min()), int(text_lengths.max())
        if lo < 0 or hi > t_full:
            raise ValueError(
                f"text_lengths must lie in [0, {t_full}] (the text block's length), got range [{lo}, {hi}]"
            )
    pos = torch.arange(n, device=text_lengths.device)  # [N]
    in_text = (pos >= text_start) & (pos < text_stop)
    padding = in_text[None, :] & (pos[None, :] - text_start >= text_lengths[:, None])  # [B, N]
    return ~padding


def _check_key_mask(key_mask, q: torch.Tensor) -> Optional[torch.Tensor]:
    """``key_mask`` checked against q ``[B, H, N, D]``: None, or a bool or float ``[B, N]`` tensor on q's device
    (``[1, N]`` is broadcast over the batch). Returns the key bias every backend takes: a contiguous float32
    ``[B, N]`` tensor (:func:`~seg4diff_fast.reference.additive_key_bias`: bool -> 0 / ``-inf``; values that
    overflow in the kernels' base-2 domain -> ``-inf``), or None."""
    if key_mask is None:
        return None
    b, _, n, _ = q.shape
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask must be a bool or float tensor [B, N] or None, got {type(key_mask).__name__}")
    if key_mask.dtype != torch.bool and not key_mask.dtype.is_floating_point:
        raise TypeError(
            f"key_mask must have dtype torch.bool (True = the key takes part) or a float dtype (an additive bias, "
            f"-inf = masked), got {key_mask.dtype}; convert a 0/1 integer mask with `mask.bool()`"
        )
    if key_mask.dim() != 2 or key_mask.shape[1] != n or key_mask.shape[0] not in (1, b):
        raise ValueError(
            f"key_mask must have shape [B, N] = [{b}, {n}] (or [1, {n}], broadcast over the batch), got "
            f"{tuple(key_mask.shape)}"
        )
    if key_mask.device != q.device:
        raise ValueError(f"key_mask must be on the device of q ({q.device}), got {key_mask.device}")
    if key_mask.requires_grad:
        raise ValueError(
            "key_mask requires grad, but the key bias gets no gradient here (it is a constant of the attention); "
            "pass key_mask.detach()"
        )
    return additive_key_bias(key_mask).expand(b, n).contiguous()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        import warnings

        from ._optional import is_missing

        if not is_missing(e, "triton"):  # installed but broken: say so, not a silent fallback
            warnings.warn(f"triton is installed but fails to import ({type(e).__name__}: {e}); the Triton backends "
                          "are unavailable")
        return False
    return True


def _cpu_flash_with_lse() -> bool:
    """Whether this torch has SDPA's CPU flash kernel that returns the log-sum-exp (the ``"sdpa"`` backend's
    attention phase on the CPU; every float dtype, any head dim)."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _runs_triton(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` launches Triton kernels for tensors on ``device``: ``"triton"`` and ``"triton-split"``
    always; ``"sdpa"`` except on the CPU, where its capture phase is torch's (:func:`_torch_backend`)."""
    return backend in ("triton", "triton-split") or (backend == "sdpa" and device.type != "cpu")


def _auto_backend(device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None,
                  mode: Optional[str] = None, measured: bool = True) -> str:
    """``backend="auto"``. CUDA: ``"triton"`` (the fused kernel); ``"torch"`` without the triton package. CPU: ``"sdpa"`` (SDPA's
    CPU flash kernel with its log-sum-exp, then the capture in torch), falling back to ``"torch"`` when this torch
    has no such kernel. Other devices: ``"torch"``."""
    # measured (the default): seg4diff_fast.selfcheck.auto_backend decides first, from the table that
    # `seg4diff-fast check --save` wrote for this head dim and capture mode, with the first-use guard of the Triton
    # backends; it calls the rule below with measured=False.
    if measured:
        from .selfcheck import auto_backend

        return auto_backend(device, dtype, head_dim, mode)
    if device.type == "cpu":
        return "sdpa" if _cpu_flash_with_lse() else "torch"
    if device.type != "cuda" or not _triton_available():
        return "torch"
    return "triton"


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float16,
                     head_dim: Optional[int] = None, mode: Optional[str] = None) -> str:
    """The backend to run; ``"auto"`` resolved for the call's device, dtype, head dim and capture mode (the
    ``mode_key`` of seg4diff_fast.selfcheck)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _auto_backend(device, dtype, head_dim, mode)
    if backend == "sdpa" and device.type == "cpu" and not _cpu_flash_with_lse():
        raise ValueError(
            f"backend='sdpa' on the CPU needs SDPA's CPU flash kernel with log-sum-exp "
            f"(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu), which torch {torch.__version__} lacks; "
            "use backend='torch'"
        )
    if _runs_triton(backend, device):
        if not _triton_available():
            raise ValueError(f"backend={backend!r} needs the triton package; install it or use backend='torch'")
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            raise ValueError(
                f"backend={backend!r} needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 before "
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
    normalize: str = "joint",
    key_mask: Optional[torch.Tensor] = None,
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
        backend: ``"auto"``, ``"triton"``, ``"triton-split"``, ``"sdpa"``, ``"torch"``, ``"reference"`` or
            ``"full-map"`` (see the module docstring).
        normalize: how the maps are normalised: ``"joint"`` (softmax over all N keys, the model's own
            probabilities), ``"text"`` (softmax over the block's key columns only: each i2t row over the
            kept text tokens, each t2i row over the image tokens; rows sum to 1; with ``text_index``, over the
            SET of selected tokens, a repeated column being a copy of the same value) or ``"logits"`` (the
            scaled scores ``q k^T * scale``, unbounded; a float16 map overflows above 65504).
        key_mask: optional ``[B, N]`` tensor on q's device (``[1, N]`` is broadcast over the batch), SDPA's
            conventions: bool, True where the key takes part (per-sample text lengths give one through
            :func:`key_mask_from_lengths`), or float (float16 / bfloat16 / float32 / float64), an additive key
            bias added to the scaled scores ``scale * q.k`` of every row before the softmax (``-inf`` = masked;
            values below about -2.36e38, e.g. ``torch.finfo(torch.float32).min``, count as ``-inf``; taken in
            float32). Masked keys get probability 0 and take no part in any normaliser; their map columns are
            exactly 0 in every normalisation; ``"logits"`` maps include the bias. Queries are not masked: every
            row, a masked text token's too, attends to the unmasked keys, as
            ``F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])`` does. A sample
            whose keys are all masked gets ``out`` 0 (what SDPA's CPU kernels return for a bool mask) and maps 0.
            A masked key takes no part at all: its rows of ``k`` and ``v`` are never read, so NaN or inf there (e.g.
            uninitialised padding) changes nothing, on every backend (SDPA itself would give NaN rows: ``0 * NaN``;
            their gradient is 0). A NaN in the bias makes the rows that see it NaN (as in SDPA). Integer masks, and
            masks that require grad (the bias gets no gradient), are refused.

    The maps are differentiable w.r.t. ``q`` and ``k`` (and ``out`` w.r.t. ``q``, ``k``, ``v``) on every
    backend, without an ``N x N`` matrix (see the module docstring).

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
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if map_dtype not in DTYPES:
        raise ValueError(f"map_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {map_dtype!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    text_index = _check_text_index(text_index, text_stop - text_start, q.device)
    key_bias = _check_key_mask(key_mask, q)
    if backend == "full-map":
        _check_full_map(capture, heads, normalize, text_index, key_bias)
    backend = _resolve_backend(backend, q.device, q.dtype, q.shape[-1], mode_key(capture, heads, normalize))
    if key_bias is not None:
        # A masked key takes no part: its k and v rows are never read (NaN or inf there would poison SDPA's rows,
        # 0 * NaN in P V). One copy of k and v, O(B H N D); the masked rows get gradient 0.
        k, v = drop_masked_keys(k, v, key_bias)

    # Triton's interpreter has no bfloat16 arithmetic (tl.dot on bf16 returns garbage, max error ~1e9): there
    # the kernel runs on float32 copies of q, k, v and out is cast back to bfloat16 (its strides kept); the maps
    # are written in map_dtype as always. On CUDA the kernel takes bf16 as it is.
    upcast = q.dtype == torch.bfloat16 and _runs_triton(backend, q.device) and _interpreting()
    if upcast:
        q, k, v = q.float(), k.float(), v.float()

    capture_i2t = capture in ("i2t", "both")
    capture_t2i = capture in ("t2i", "both")
    # The kernels, the map gradients and normalize="text" (a softmax over the SET of kept columns) take unique
    # text columns; repeated ones are gathered from the result afterwards (autograd sums their gradients). The
    # backends that capture in torch (torch, reference, sdpa on the CPU) compute joint maps of repeated columns as
    # they are: there, when no map gradient is needed, this data-dependent step (a graph break under
    # torch.compile) is skipped.
    maps_need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    repeats_ok = not _runs_triton(backend, q.device) and normalize == "joint" and not maps_need_grad
    expand = None
    if text_index is not None and not repeats_ok:
        unique, inverse = torch.unique(text_index, return_inverse=True)
        if unique.numel() != text_index.numel():
            text_index, expand = unique, inverse

    out, i2t, t2i = torch.ops.seg4diff_fast.joint_attention(
        q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads == "mean", text_index, map_dtype,
        float(scale), backend, normalize, key_bias,
    )
    if upcast:
        out = out.to(torch.bfloat16)
    i2t = i2t if capture_i2t else None
    t2i = t2i if capture_t2i else None
    if expand is not None:
        i2t = None if i2t is None else i2t[..., expand]
        t2i = None if t2i is None else t2i[..., expand, :]
    return out, AttentionMaps(i2t=i2t, t2i=t2i)


def _check_full_map(capture, heads, normalize, text_index, key_bias) -> None:
    """Refuse what ``backend="full-map"`` (``reference.full_map_attention``, Seg4Diff's own path) does not compute."""
    unsupported = [
        f"{name}={value!r}" for name, value, ok in (
            ("capture", capture, capture in ("i2t", None)), ("heads", heads, heads == "mean"),
            ("normalize", normalize, normalize == "joint"),
            ("text_index", "<tensor>", text_index is None), ("key_mask", "<tensor>", key_bias is None),
        ) if not ok
    ]
    if unsupported:
        raise ValueError(
            "backend='full-map' is Seg4Diff's own path (reference.full_map_attention, for benchmarks): it computes "
            "capture='i2t' (or None), heads='mean', normalize='joint' maps of every text column without a key mask; "
            f"got {', '.join(unsupported)}"
        )


# --------------------------------------------------------------------------------------------------------
# The custom op. Arguments are already checked; text_index is None or unique positions in the text block;
# key_bias is None or a contiguous float32 [B, N] (added to the scaled scores, -inf = masked; _check_key_mask).
# Maps that are not captured come back as empty tensors (a custom op cannot return None).


def _map_shapes(q, text_start, text_stop, heads_mean, text_index):
    b, h, n, _ = q.shape
    n_img = n - (text_stop - text_start)
    t = text_stop - text_start if text_index is None else text_index.shape[0]
    lead = (b,) if heads_mean else (b, h)
    return lead + (n_img, t), lead + (t, n_img)


def _without_autocast(op):
    """``op`` run with autocast off on the device of its tensors: every backend computes in the precision it
    documents (float32 scores, probabilities and sums), whatever ``torch.autocast`` region it is called in; under
    ``autocast(bfloat16)`` the torch backend's matmuls would otherwise run in bfloat16 (maps off by 1e-2)."""
    @functools.wraps(op)
    def run(*args, **kwargs):
        device = next(t.device.type for t in args if isinstance(t, torch.Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return op(*args, **kwargs)

    return run


@torch.library.custom_op("seg4diff_fast::joint_attention", mutates_args=())
@_without_autocast
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
    normalize: str,
    key_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from .kernels import capture_maps, joint_attention_fwd

        # The fused kernel writes joint maps; the other normalisations need no lse: the capture kernel
        # computes them from q and k over the image x text block alone.
        joint = normalize == "joint"
        out, i2t, t2i = joint_attention_fwd(
            q, k, v, text_start, text_stop, capture_i2t=capture_i2t and joint, capture_t2i=capture_t2i and joint,
            heads_mean=heads_mean, text_index=text_index, map_dtype=map_dtype, scale=scale, key_bias=key_bias,
        )
        if not joint:
            i2t, t2i = capture_maps(
                q, k, None, text_start, text_stop, capture_i2t=capture_i2t, capture_t2i=capture_t2i,
                heads_mean=heads_mean, text_index=text_index, map_dtype=map_dtype, scale=scale, normalize=normalize,
                key_bias=key_bias,
            )
    elif _runs_triton(backend, q.device):  # "triton-split", "sdpa" on CUDA
        out, i2t, t2i = _split_backend(
            q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype, scale,
            attention_source="triton" if backend == "triton-split" else "sdpa", normalize=normalize,
            key_bias=key_bias,
        )
    elif backend == "full-map":  # Seg4Diff's own path in the input dtype (joint_attention checked the mode)
        if capture_i2t:
            out, i2t = full_map_attention(q, k, v, text_start, text_stop, scale=scale)
            i2t = i2t.to(map_dtype)
        else:
            out, i2t = F.scaled_dot_product_attention(q, k, v, scale=scale), None
        t2i = None
    elif backend in ("torch", "sdpa"):  # "sdpa" on the CPU: SDPA's CPU flash kernel, then the capture in torch
        out, i2t, t2i = _torch_backend(
            q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype, scale,
            normalize, key_bias, fused_only=backend == "sdpa",
        )
    else:
        capture = {(True, True): "both", (True, False): "i2t", (False, True): "t2i"}.get((capture_i2t, capture_t2i))
        out, i2t, t2i = reference_joint_attention(
            q, k, v, text_start, text_stop, capture=capture, heads="mean" if heads_mean else "all",
            text_index=text_index, scale=scale, compute_dtype=_acc_dtype(q), normalize=normalize, key_mask=key_bias,
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
def _(q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype, scale, backend,
      normalize, key_bias=None):
    i2t_shape, t2i_shape = _map_shapes(q, text_start, text_stop, heads_mean, text_index)
    return (
        torch.empty_like(q),  # the strides _strided_like gives the real outputs
        q.new_empty(i2t_shape if capture_i2t else (0,), dtype=map_dtype),
        q.new_empty(t2i_shape if capture_t2i else (0,), dtype=map_dtype),
    )


def _setup_context(ctx, inputs, output):
    (q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, _, scale, backend, normalize,
     key_bias) = inputs
    ctx.save_for_backward(q, k, v, text_index, key_bias)
    ctx.args = (text_start, text_stop, heads_mean, scale, backend, normalize)
    ctx.captured = (capture_i2t, capture_t2i)
    # Outputs that no loss used get None, not zeros: no map backward for a map that carries no gradient.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_i2t, grad_t2i):
    q, k, v, text_index, key_bias = ctx.saved_tensors
    capture_i2t, capture_t2i = ctx.captured
    maps_reach = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # the maps depend on q and k only
    grad_i2t = grad_i2t if capture_i2t and maps_reach else None
    grad_t2i = grad_t2i if capture_t2i and maps_reach else None
    dq, dk, dv = torch.ops.seg4diff_fast.joint_attention_backward(
        grad_out, grad_i2t, grad_t2i, q, k, v, text_index, *ctx.args, key_bias
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


@torch.library.custom_op("seg4diff_fast::joint_attention_backward", mutates_args=())
@_without_autocast
def _joint_attention_backward_op(
    grad_out: Optional[torch.Tensor],
    grad_i2t: Optional[torch.Tensor],
    grad_t2i: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_index: Optional[torch.Tensor],
    text_start: int,
    text_stop: int,
    heads_mean: bool,
    scale: float,
    backend: str,
    normalize: str,
    key_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous ``[B, H, N, D]`` in q's dtype, from the gradients of ``out`` ``[B, H, N, D]``
    and of the maps ``i2t`` ``[B, (H,) N_img, T]`` / ``t2i`` ``[B, (H,) T, N_img]`` (any of them None), with the
    forward's ``key_bias`` (None or float32 ``[B, N]``)."""
    b, h, n, d = q.shape
    if grad_out is not None:
        # out's gradient: attention recomputed and differentiated by torch.func (this op runs below autograd),
        # through the fused kernel itself (sdpa_with_lse), not F.scaled_dot_product_attention: that one picks its
        # kernel from global flags, and with flash disabled (torch.backends.cuda.enable_flash_sdp(False), which
        # also governs the CPU) it takes the math path, which holds the [B, H, N, N] probabilities.
        _, vjp = torch.func.vjp(lambda q, k, v: _fused_attention(q, k, v, scale, key_bias), q, k, v)
        dq, dk, dv = (_acc(t) for t in vjp(grad_out.to(q.dtype)))
    else:
        dq, dk, dv = (q.new_zeros(b, h, n, d, dtype=_acc_dtype(q)) for _ in range(3))
    if grad_i2t is not None or grad_t2i is not None:
        if normalize == "joint" and _runs_triton(backend, q.device):
            from .kernels import joint_maps_backward

            map_dq, map_dk = joint_maps_backward(
                q, k, grad_i2t, grad_t2i, text_start, text_stop, heads_mean=heads_mean, text_index=text_index,
                scale=scale, key_bias=key_bias,
            )
        elif normalize == "joint":
            map_dq, map_dk = _joint_map_grads_torch(
                q, k, grad_i2t, grad_t2i, text_start, text_stop, heads_mean, text_index, scale, key_bias
            )
        else:
            map_dq, map_dk = _block_map_grads_torch(
                q, k, grad_i2t, grad_t2i, text_start, text_stop, heads_mean, text_index, scale, normalize, key_bias
            )
        dq, dk = dq + map_dq, dk + map_dk
    return tuple(t.to(q.dtype).contiguous() for t in (dq, dk, dv))


@_joint_attention_backward_op.register_fake
def _(grad_out, grad_i2t, grad_t2i, q, k, v, text_index, text_start, text_stop, heads_mean, scale, backend, normalize,
      key_bias=None):
    return tuple(q.new_empty(q.shape) for _ in range(3))


_joint_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# The split backends: an attention phase that gives out and lse, then the capture kernel.


def _cudnn_with_lse(q, k, v, scale):
    """cuDNN's fused attention (usually torch's fastest on sm90+) with its log-sum-exp: ``(out, lse [B, H, N]
    natural log, float32)``, or None where cuDNN does not take these inputs (no CUDA, fp32, old torch, ...)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    b, h, n, _ = q.shape
    lse = res[1]
    if lse.numel() != b * h * n:
        return None
    return res[0], lse.reshape(b, h, n).float()


def _no_sdpa_kernel_message(q: torch.Tensor) -> str:
    return (f"backend='sdpa': no SDPA kernel with log-sum-exp takes these inputs ({q.dtype} on {q.device}, "
            f"D={q.shape[-1]}); use backend='triton-split' or 'torch'")


def _split_backend(q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype,
                   scale, attention_source, normalize="joint", key_bias=None):
    """``out`` from our attention kernel (``attention_source="triton"``) or from torch's fastest SDPA kernel
    (``"sdpa"``: cuDNN / flash / memory-efficient on CUDA, see :func:`sdpa_with_lse`; with a ``key_bias`` the
    memory-efficient kernel with the bias), then the maps from ``kernels.capture.capture_maps``. Returns
    ``(out [B, H, N, D], i2t or None, t2i or None)``.

    The "joint" maps ``exp2(s * qk_scale - lse2)`` are only as exact as the lse cancels the row's largest score: it
    must be rounded as the capture kernel rounds the scores. Our attention kernel hands over its base-2 lse as it
    computed it (a natural lse converted there and back costs about ``2^-24 * |lse|`` in every exponent: 1e-2 at
    ``scale`` 1e4, inf at 1e10); SDPA's lse rounds the scores its own way (a different dot-product order, the scale
    applied elsewhere), so for ``"sdpa"`` the capture phase computes the captured rows' lse itself (one more pass
    over those rows x N keys, no ``N x N`` matrix) and SDPA gives ``out`` only."""
    from .kernels import attention_fwd, capture_maps

    if attention_source == "triton":
        out, lse = attention_fwd(q, k, v, scale=scale, key_bias=key_bias, lse_base="2")
    else:
        fused = (_cudnn_with_lse(q, k, v, scale) if key_bias is None else None) or sdpa_with_lse(q, k, v, scale,
                                                                                                 key_bias)
        if fused is None:
            raise RuntimeError(_no_sdpa_kernel_message(q))
        out, lse = fused[0], None  # out's strides are put right by the caller (_joint_attention_op)
        # NaN where the reference is NaN, as the fused kernel and the torch backend give it: SDPA's kernels return
        # zeros for a row whose logits are all -inf. O(B H N D).
        poison = _non_finite_rows(q)  # [B, H, N]
        if key_bias is not None:
            poison = poison.masked_fill(_dead_samples(key_bias), 0.0)  # a fully masked sample stays 0
        out = out + poison[..., None].to(out.dtype)
    if not (capture_i2t or capture_t2i):
        return out, None, None
    i2t, t2i = capture_maps(
        q, k, lse, text_start, text_stop, capture_i2t=capture_i2t, capture_t2i=capture_t2i,
        heads_mean=heads_mean, text_index=text_index, map_dtype=map_dtype, scale=scale, lse_base="2",
        normalize=normalize, key_bias=key_bias,
    )
    return out, i2t, t2i


# --------------------------------------------------------------------------------------------------------
# The torch backend.


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  key_bias: Optional[torch.Tensor] = None):
    """SDPA's output ``[B, H, N, D]`` and each query row's log-sum-exp ``[B, H, N]`` (natural log, float32), from
    one fused SDPA kernel: flash on the CPU; flash (fp16/bf16) or memory-efficient on CUDA. ``None`` where no
    such kernel takes these inputs (other devices, or a torch without these private ops).

    ``key_bias`` (None or float32 ``[B, N]``, added to the scaled scores, ``-inf`` = masked) goes in as SDPA's
    additive ``attn_mask`` (CPU flash: float32; CUDA memory-efficient: in q's dtype, which that kernel requires;
    CUDA flash takes none). Rows of a sample with no unmasked key come back with ``out`` 0 and lse ``+inf``
    (:func:`_fix_dead_rows`), whatever the kernel gave there.
    """
    b, h, n, _ = q.shape
    bias = None
    if key_bias is not None:
        # [B, 1, 1, N]; the CUDA kernel wants the bias's rows 16-element aligned: a padded [B, 1, 1, N16] buffer,
        # sliced and broadcast to [B, H, N, N].
        n16 = -(-n // 16) * 16
        bias = q.new_zeros(b, 1, 1, n16, dtype=torch.float32 if q.device.type == "cpu" else q.dtype)
        bias[..., :n] = key_bias[:, None, None, :]
        bias = bias[..., :n]
    try:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias,
                                                                                   scale=scale)[:2]
            return _fix_dead_rows(out, lse, key_bias)
        if q.device.type == "cuda":
            if bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
                try:
                    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
                    return res[0], res[1]
                except RuntimeError:  # e.g. a GPU without flash attention: try the efficient kernel
                    pass
            bias = None if bias is None else bias.expand(b, h, n, n)
            res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)
            # this kernel pads lse to a multiple of 32
            return _fix_dead_rows(res[0], res[1][..., : q.shape[-2]], key_bias)
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return None


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     key_bias: Optional[torch.Tensor] = None, fused_only: bool = False) -> torch.Tensor:
    """SDPA's output ``[B, H, N, D]`` from a fused kernel called directly (:func:`sdpa_with_lse`), whatever the
    global SDPA backend flags say; ``F.scaled_dot_product_attention`` only where no fused kernel takes the inputs
    (``fused_only``: a RuntimeError there instead). ``key_bias``: None or float32 ``[B, N]``."""
    fused = sdpa_with_lse(q, k, v, scale, key_bias)
    if fused is not None:
        return fused[0]
    if fused_only:
        raise RuntimeError(_no_sdpa_kernel_message(q))
    attn_mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _dead_samples(key_bias: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 1]`` bool: True for the samples of a ``[B, N]`` key bias whose keys are all masked (``-inf``; their
    rows are 0). A NaN bias is not masked (it makes its rows NaN)."""
    return ~(key_bias != float("-inf")).any(dim=1)[:, None, None]


def _fix_dead_rows(out: torch.Tensor, lse: torch.Tensor, key_bias: Optional[torch.Tensor]):
    """``(out [B, H, N, D], lse [B, H, N])`` with the rows of fully masked samples set to the project's contract:
    ``out`` 0 (what SDPA's CPU kernels return) and lse ``+inf`` (FlashAttention's convention for an empty row;
    it makes every map entry ``exp(s - lse)`` 0). SDPA kernels give lse 0 (CPU flash) or ``-inf`` (CUDA
    memory-efficient) there. O(B H N D), only with a mask."""
    if key_bias is None:
        return out, lse
    dead = _dead_samples(key_bias)
    return out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, float("inf"))


def _chunk_rows(b: int, h: int, width: int, device: torch.device) -> int:
    """Query rows per chunk so that one chunk of ``[B, H, rows, width]`` float32 scores on ``device`` fits the
    budget (:data:`_TORCH_CHUNK_BYTES`; on the CPU also :data:`_CPU_CHUNK_BYTES`)."""
    budget = min(_TORCH_CHUNK_BYTES, _CPU_CHUNK_BYTES) if device.type == "cpu" else _TORCH_CHUNK_BYTES
    return max(1, budget // (b * h * max(width, 1) * 4))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the torch paths compute in: float32, or float64 for float64 tensors (which only the op-level
    float64 gradcheck of the tests passes; the public API takes float16, bfloat16 and float32)."""
    return torch.promote_types(t.dtype, torch.float32)


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(_acc_dtype(t))


def _text_and_image_positions(n, text_start, text_stop, text_index, device):
    """Sequence positions ``([T] kept text columns, [N_img] image tokens)``; text_index is unique here."""
    text_cols = torch.arange(text_start, text_stop, device=device)
    if text_index is not None:
        text_cols = text_cols[text_index]
    return text_cols, image_positions(n, text_start, text_stop, device=device)


def _non_finite_rows(q: torch.Tensor) -> torch.Tensor:
    """``[B, H, N]`` float32: 0 for query rows whose entries are all finite, NaN for the others (one pass over
    ``q`` ``[B, H, N, D]``). Added to ``out`` and the lse of backends whose SDPA kernel treats such rows like
    masked ones (zeros), so that they are NaN as in the reference."""
    return (q - q).sum(dim=-1, dtype=torch.float32)


def _torch_backend(
    q, k, v, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype, scale, normalize,
    key_bias=None, fused_only=False,
):
    """Pure-PyTorch joint attention with capture. Returns ``(out [B, H, N, D], i2t or None, t2i or None)``.

    ``out`` comes from one fused SDPA kernel (:func:`_fused_attention`; with ``fused_only``, the ``"sdpa"`` backend
    on the CPU, a RuntimeError where none takes the inputs); the maps from :func:`_torch_maps`, a chunk of query rows
    at a time: no ``N x N`` matrix. ``key_bias``: None or float32 ``[B, N]``.
    """
    # A query row with a non-finite entry is NaN in the joint softmax (each of its logits is +-inf or NaN, so the
    # row holds inf - inf, 0/0 or NaN), as the reference and the kernel give it; SDPA's fused CPU kernel returns
    # zeros for a row whose logits are all -inf, like a masked row.
    poison = _non_finite_rows(q)  # [B, H, N] float32: 0 for finite rows, NaN for the others
    if key_bias is not None:
        poison = poison.masked_fill(_dead_samples(key_bias), 0.0)  # a fully masked sample is 0, as in SDPA
    # Always the fused kernel, called directly: F.scaled_dot_product_attention follows the global backend flags
    # and, with flash disabled, would materialise the N x N probabilities (see _fused_attention).
    out = _fused_attention(q, k, v, scale, key_bias, fused_only=fused_only)
    out = out + poison[..., None].to(out.dtype)
    i2t, t2i = _torch_maps(
        q, k, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype, scale, normalize,
        key_bias,
    )
    return out, i2t, t2i


def _map_blocks(n, text_start, text_stop, text_index, device, i2t, t2i):
    """``(query positions, key positions, item)`` of each wanted map: i2t is image rows x kept text columns,
    t2i kept text rows x image columns; ``item`` (the map's buffer or gradient) passes through, None = skip."""
    text_cols, img_cols = _text_and_image_positions(n, text_start, text_stop, text_index, device)
    blocks = [(img_cols, text_cols, i2t)] if i2t is not None else []
    return blocks + ([(text_cols, img_cols, t2i)] if t2i is not None else [])


def _joint_probs_(s, bias, dead):
    """Scores ``s`` ``[B, H, c, N]`` (the float32 ``scale * q.k`` of c query rows x all N keys) turned IN PLACE into
    the joint probabilities P (softmax over all N keys, the key bias ``[B, 1, 1, N]`` added; None without one;
    ``dead`` ``[B, 1, 1, 1]`` marks fully masked samples, whose P is 0). One buffer, no other copy of its size.
    A row with a NaN or +inf logit, or only -inf logits, is NaN, as in the reference."""
    if bias is not None:  # masked keys -inf; a fully masked sample's rows 0 (finite), zeroed below
        s = s.add_(bias).masked_fill_(dead, 0.0)
    s = s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
    s = s.div_(s.sum(dim=-1, keepdim=True))
    return s if dead is None else s.masked_fill_(dead, 0.0)


def _torch_maps(q, k, text_start, text_stop, capture_i2t, capture_t2i, heads_mean, text_index, map_dtype, scale,
                normalize, key_bias=None):
    """The maps ``(i2t [B, (H,) N_img, T] or None, t2i [B, (H,) T, N_img] or None)`` in map_dtype, in float32, a
    chunk of the map's rows at a time (at most ``_TORCH_CHUNK_BYTES`` of scores).

    ``"joint"``: each chunk of rows gets its scores over all N keys and their softmax (:func:`_joint_probs_`), and
    the map is its block columns: the normaliser and the map entries come from the same rounded scores, so a row's
    largest score cancels exactly (an lse from another kernel, SDPA's, rounds them differently: an error of about
    ``2^-24 * |lse|`` in every exponent, 1e-2 at ``scale`` 1e4). ``"text"`` and ``"logits"``: the block's columns
    only. ``key_bias`` (None or float32 ``[B, N]``) is added to the scores (``"logits"`` too); masked key columns
    (``-inf``) are 0 in every normalisation and left out of the ``"text"`` softmax (a fully masked sample has every
    column masked, so its maps are 0).
    """
    b, h, n, _ = q.shape
    i2t_shape, t2i_shape = _map_shapes(q, text_start, text_stop, heads_mean, text_index)
    i2t = q.new_empty(i2t_shape, dtype=map_dtype) if capture_i2t else None
    t2i = q.new_empty(t2i_shape, dtype=map_dtype) if capture_t2i else None
    joint = normalize == "joint"
    dead = None if key_bias is None else _dead_samples(key_bias)[..., None]  # [B, 1, 1, 1]
    for rows, cols, result in _map_blocks(n, text_start, text_stop, text_index, q.device, i2t, t2i):
        keys = slice(None) if joint else cols  # the scores' key columns: all N for "joint", else the block's
        kt = _acc(k[:, :, keys]).transpose(-1, -2)  # [B, H, D, N or C]
        bias = None if key_bias is None else _acc(key_bias[:, None, None, keys])  # [B, 1, 1, N or C]
        valid = None if key_bias is None else key_bias[:, None, None, cols] != float("-inf")  # [B, 1, 1, C]
        step = _chunk_rows(b, h, kt.shape[-1], q.device)
        for r in range(0, rows.numel(), step):
            p = rows[r:r + step]
            s = torch.matmul(_acc(q[:, :, p]) * scale, kt)  # [B, H, c, N or C]
            if joint:
                s = _joint_probs_(s, bias, dead)[..., cols]
            else:
                s = s if bias is None else s.add_(bias)
                s = masked_softmax(s, valid) if normalize == "text" else s
            if valid is not None and normalize != "text":  # masked columns 0, a NaN row's too (as the kernels)
                s = s.masked_fill_(~valid, 0.0)
            result[..., r:r + p.numel(), :] = s.mean(dim=1) if heads_mean else s
    return i2t, t2i


# --------------------------------------------------------------------------------------------------------
# Map gradients in torch (see the module docstring for the formulas). Both return float32 ``(dq, dk)``
# ``[B, H, N, D]``; grad_i2t ``[B, (H,) N_img, T]`` and grad_t2i ``[B, (H,) T, N_img]`` may be None.


def _per_head(g, h, heads_mean):
    """The gradient of each head's map, float32 ``[B, H or 1, ...]``: with heads="mean", dL/dM_h = G / H."""
    g = _acc(g)
    return g.unsqueeze(1) / h if heads_mean else g


def _block_map_grads_torch(q, k, grad_i2t, grad_t2i, text_start, text_stop, heads_mean, text_index, scale, normalize,
                           key_bias=None):
    """``"text"`` and ``"logits"``: the maps depend on the image x text score block only, recomputed a chunk of
    the map's rows at a time (with all its columns) like :func:`_torch_maps`. Masked key columns are constants
    (0) of the maps: they pass no gradient."""
    b, h, n, d = q.shape
    dq = q.new_zeros(b, h, n, d, dtype=_acc_dtype(q))
    dk = torch.zeros_like(dq)
    for rows, cols, grad in _map_blocks(n, text_start, text_stop, text_index, q.device, grad_i2t, grad_t2i):
        k_cols = _acc(k[:, :, cols])  # [B, H, C, D]
        bias = None if key_bias is None else _acc(key_bias[:, None, None, cols])  # [B, 1, 1, C]
        valid = None if bias is None else bias != float("-inf")  # [B, 1, 1, C]
        dk_cols = torch.zeros_like(k_cols)
        step = _chunk_rows(b, h, cols.numel(), q.device)
        for r in range(0, rows.numel(), step):
            p = rows[r:r + step]
            q_rows = _acc(q[:, :, p])  # [B, H, c, D]
            g = _per_head(grad[..., r:r + p.numel(), :], h, heads_mean)  # [B, H or 1, c, C]
            if normalize == "logits":
                ds = g.expand(b, h, p.numel(), cols.numel())
                ds = ds if valid is None else ds.masked_fill(~valid, 0.0)
            else:  # softmax over the row's (valid) block columns: dS = M (G - sum G M), 0 where M is masked
                s = torch.matmul(q_rows, k_cols.transpose(-1, -2)) * scale  # [B, H, c, C]
                m = masked_softmax(s if bias is None else s + bias, valid)
                ds = m * (g - (g * m).sum(dim=-1, keepdim=True))
            dq[:, :, p] += torch.matmul(ds, k_cols) * scale
            dk_cols += torch.matmul(ds.transpose(-1, -2), q_rows) * scale
        dk[:, :, cols] += dk_cols
    return dq, dk


def _joint_map_grads_torch(q, k, grad_i2t, grad_t2i, text_start, text_stop, heads_mean, text_index, scale,
                           key_bias=None):
    """``"joint"``: chunks of the map's query rows x all N keys (the row's lse reaches every key), one
    ``[B, H, rows, N]`` buffer a chunk: the scores, turned in place into P, then into dS = P (G - c) with
    c = sum G P per row over the captured columns (G = 0 elsewhere). Masked keys have P = 0, so dS = 0 there;
    a fully masked sample's P is 0 everywhere."""
    b, h, n, d = q.shape
    dq = q.new_zeros(b, h, n, d, dtype=_acc_dtype(q))
    dk = torch.zeros_like(dq)
    kt = _acc(k).transpose(-1, -2)  # [B, H, D, N]
    bias = None if key_bias is None else _acc(key_bias[:, None, None, :])  # [B, 1, 1, N]
    dead = None if key_bias is None else _dead_samples(key_bias)[..., None]  # [B, 1, 1, 1]
    step = _chunk_rows(b, h, n, q.device)
    # i2t rows are image tokens, t2i rows text tokens: disjoint, so each row's c comes from one map.
    for rows, cols, grad in _map_blocks(n, text_start, text_stop, text_index, q.device, grad_i2t, grad_t2i):
        for r in range(0, rows.numel(), step):
            p = rows[r:r + step]
            q_rows = _acc(q[:, :, p])  # [B, H, c, D]
            ds = _joint_probs_(torch.matmul(q_rows * scale, kt), bias, dead)  # S, then P in place  [B, H, c, N]
            g = _per_head(grad[..., r:r + p.numel(), :], h, heads_mean)  # [B, H or 1, c, C]
            gp = g * ds[..., cols]  # G P on the captured columns  [B, H, c, C]
            c = gp.sum(dim=-1, keepdim=True)  # [B, H, c, 1]
            ds = ds.mul_(c.neg())  # -P c on every key ...
            ds[..., cols] += gp  # ... + P G on the captured ones: dS = P (G - c)
            dq[:, :, p] += torch.matmul(ds, kt.transpose(-1, -2)) * scale
            dk += torch.matmul(ds.transpose(-1, -2), q_rows) * scale
    return dq, dk
