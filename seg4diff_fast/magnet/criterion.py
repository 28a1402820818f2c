"""MAGNET's mask-alignment loss: candidate maps from the expert layer's i2t scores, Hungarian matching, focal + dice.

What the paper's code does (cvlab-kaist/Seg4Diff at bb500ca; it produced the paper's numbers, so it is followed where
it and the paper's text differ; each difference is an option here):

- Maps: the scaled scores ``q k^T / sqrt(d)`` of block 9 (``BACKBONE.SOFTMAX: False`` in ``configs/train_*.yaml``;
  ``diffusers/.../attention_processor.py`` l. 1095-1111), image rows x the 77 CLIP text columns, reshaped to the
  64 x 64 latent grid (``seg4diff_model_train.py`` l. 328-335). Here: ``joint_attention(..., normalize="logits")``.
- Candidates, COCO (class masks, ``KEEP_HEAD: False``): the head-mean map of each text column; a class's candidate
  is the mean of the columns of its name's tokens (l. 356-367), and candidate j is supervised by class j's mask:
  **no Hungarian matching** on this path (l. 391-394: identity pairs), although the paper's text describes matching.
  :func:`candidates_from_maps` ``mode="token"`` + :class:`MaskAlignmentLoss` ``matching="index"`` (the default for
  token candidates). The paper's code finds a name's columns with ``torch.isin`` on token ids, which also takes
  any other prompt position holding one of those ids (a shared ``-`` or a repeated word); here the columns come
  from character spans (:mod:`seg4diff_fast.segmentation.tokens`), only the name's own positions.
- Candidates, SA-1B (class-agnostic masks, ``KEEP_HEAD: True``): every (head, text column) map is a candidate,
  24 x 77 = 1848 at SD3 (``rearrange(... "b l n t -> b n (l t)")``, l. 331-332, head-major), all 77 columns
  including BOS, EOS and padding; Hungarian matching to the masks (l. 421-426). ``mode="head"``.
- A small trainable conv head refines every column map before the loss (``USE_ATTN_MLP: True``;
  ``AttentionScoreLayer``: conv3x3 1->64, ReLU, conv3x3 64->64, ReLU, conv3x3 64->1, added as a residual, l. 336-345,
  856-870). The training model's validation computes it but segments from the raw maps (l. 458-473); the OVSS
  model applies it without the residual when ``USE_ATTN_MLP`` is set, which its eval configs do not.
  :class:`ResidualMapHead`; pass it as ``refine=`` (optional; its parameters train at BASE_LR 1e-4, as the LoRA:
  the code's ``BACKBONE_MULTIPLIER`` is never applied). ``train`` saves it beside the LoRA and
  :class:`~seg4diff_fast.magnet.train.MapHeadSource` applies it at inference.
- Matching cost (``modeling/matcher.py``): ``0.02 * focal + 1.0 * dice`` (``SEM_SEG_HEAD.MASK_WEIGHT 0.02``,
  ``DICE_WEIGHT 1.0``, ``CLASS_WEIGHT 0``: no class term) at the map grid: ground-truth masks are downsampled
  *nearest* to the grid (l. 154). Unmatched candidates get no loss: ``losses=["masks"]`` only, so the
  "no object" class weight ``eos_coef 0.1`` is never used. An image with no mask gives no pair.
- Loss (``modeling/criterion.py`` ``loss_masks``): matched candidates upsampled *bilinearly* (align_corners False)
  to the mask size, sigmoid focal (alpha 0.25, gamma 2) averaged over pixels, dice with +1 smoothing, each summed
  over pairs and divided by the number of masks (at least 1); then x ``MASK_LOSS_WEIGHT 0.1`` and
  ``DICE_LOSS_WEIGHT 0.2`` (``configs/train_*.yaml``).
- Cost threshold (``SEM_SEG_HEAD.COST_THRESH``, ``None`` in every official config): the matcher keeps a mask
  when the *mean* of its cost column over all candidates is below the threshold (``C.mean(0) < cost_thresh``,
  ``matcher.py`` l. 173-178, after the cost and before ``linear_sum_assignment``, which still matches every mask),
  and ``SetCriterion.forward`` (l. 167-171) then indexes the batch with the per-image keep flags. That indexing only
  works for a micro-batch of one image holding exactly one mask (any other shape raises IndexError), and there only
  when the mask is kept (the loss is then the unthresholded one); a dropped mask empties the batch and
  ``loss_masks`` raises IndexError. ``cost_thresh`` here is that rule for any batch: each image's masks whose mean
  cost over its valid candidates is not below the threshold lose their matched pair (matching first, as the
  official order), so they get no loss and do not count in the normaliser. Hungarian matching only: the COCO path
  never calls the matcher.
- Focal modulation: the code's focal loss overwrites ``prob = inputs.sigmoid()`` with ``prob = inputs``
  (``criterion.py`` l. 49-50, ``matcher.py`` l. 69-70): the factor ``(1 - p_t)^gamma`` uses the raw score as if it
  were a probability. The BCE term is the usual one. ``focal_modulation="logits"`` (default) reproduces it;
  ``"sigmoid"`` is RetinaNet's focal loss as the paper's text describes it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["hungarian_match", "sigmoid_focal_loss", "dice_loss", "pairwise_focal_cost", "pairwise_dice_cost",
           "ResidualMapHead", "candidates_from_maps", "MaskAlignmentLoss"]

_MODULATIONS = ("logits", "sigmoid")


def hungarian_match(cost: torch.Tensor | np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of rows (candidates) to columns (masks).

    cost: ``[Q, M]``, finite. Returns ``(rows, cols)``, int64 arrays of length ``min(Q, M)``, rows ascending:
    ``cost[rows, cols].sum()`` is minimal (scipy's ``linear_sum_assignment``, as the paper's matcher).
    """
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().to("cpu", torch.float64).numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost, np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost must be a [Q, M] matrix, got shape {tuple(c.shape)}")
    if not np.isfinite(c).all():
        raise ValueError("cost has NaN or inf entries: the candidate maps or the masks hold non-finite values")
    if c.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = linear_sum_assignment(c)
    return rows.astype(np.int64), cols.astype(np.int64)


def _focal_terms(logits: torch.Tensor, alpha: float, gamma: float, modulation: str):
    """Per-pixel focal loss if the pixel is positive (``pos``) or negative (``neg``); logits ``[..., P]``."""
    if modulation not in _MODULATIONS:
        raise ValueError(f"focal_modulation must be one of {_MODULATIONS}, got {modulation!r}")
    p = logits.sigmoid() if modulation == "sigmoid" else logits
    pos = F.softplus(-logits) * (1 - p) ** gamma  # BCE(x, 1) = softplus(-x)
    neg = F.softplus(logits) * p ** gamma  # BCE(x, 0) = softplus(x)
    if alpha >= 0:
        pos, neg = alpha * pos, (1 - alpha) * neg
    return pos, neg


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       modulation: str = "logits") -> torch.Tensor:
    """Focal loss of each (map, mask) pair, averaged over pixels.

    logits ``[K, P]`` (candidate scores), targets ``[K, P]`` in {0, 1} -> ``[K]``.
    ``alpha_t * BCE(x, t) * (1 - p_t)^gamma`` with ``p_t = p t + (1 - p)(1 - t)``, ``p = x`` (``modulation="logits"``,
    the paper's code) or ``sigmoid(x)`` (``"sigmoid"``, RetinaNet).
    """
    pos, neg = _focal_terms(logits, alpha, gamma, modulation)
    return (pos * targets + neg * (1 - targets)).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1)`` with ``s = sigmoid(x)``; ``[K, P]`` x ``[K, P]`` -> ``[K]``."""
    s = logits.sigmoid()
    return 1 - (2 * (s * targets).sum(-1) + 1) / (s.sum(-1) + targets.sum(-1) + 1)


def pairwise_focal_cost(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                        modulation: str = "logits") -> torch.Tensor:
    """:func:`sigmoid_focal_loss` of every candidate with every mask: ``[Q, P]`` x ``[M, P]`` -> ``[Q, M]``."""
    pos, neg = _focal_terms(logits, alpha, gamma, modulation)
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[-1]


def pairwise_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`dice_loss` of every candidate with every mask: ``[Q, P]`` x ``[M, P]`` -> ``[Q, M]``."""
    s = logits.sigmoid()
    return 1 - (2 * (s @ targets.T) + 1) / (s.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)


class ResidualMapHead(nn.Module):
    """The paper's ``AttentionScoreLayer`` (``USE_ATTN_MLP``): ``x + conv(relu(conv(relu(conv(x)))))``, 3x3 convs
    1 -> ``width`` -> ``width`` -> 1, applied to each map on its own. ``[K, 1, h, w]`` -> ``[K, 1, h, w]``.
    At inference only on request (``segment`` / ``eval --attn-mlp``)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps + self.layers(maps)


def _to_grid(i2t: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``[..., N_img, T]`` -> ``[..., T, h, w]`` (image tokens are row-major on the patch grid)."""
    h, w = int(grid[0]), int(grid[1])
    if i2t.shape[-2] != h * w:
        raise ValueError(f"i2t has {i2t.shape[-2]} image tokens but grid {h}x{w} holds {h * w}")
    return i2t.transpose(-1, -2).reshape(*i2t.shape[:-2], i2t.shape[-1], h, w)


def _refine(maps: torch.Tensor, refine) -> torch.Tensor:
    if refine is None:
        return maps
    lead = maps.shape[:-2]
    return refine(maps.reshape(-1, 1, *maps.shape[-2:])).reshape(*lead, *maps.shape[-2:])


def candidates_from_maps(
    i2t: torch.Tensor,
    grid: Tuple[int, int],
    mode: str = "token",
    token_groups: Optional[Sequence[Sequence[Sequence[int]]]] = None,
    columns: Optional[Sequence[int]] = None,
    refine: Optional[nn.Module] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Candidate mask logits from captured i2t maps.

    i2t: ``[B, H, N_img, T]`` (per head) or ``[B, N_img, T]`` (head mean), e.g. ``maps.i2t`` of
    ``joint_attention(..., normalize="logits")``; grid ``(h, w)`` with ``h * w == N_img``.

    - ``mode="token"`` (class masks, the paper's COCO run): per-head maps are averaged over heads first; candidate
      ``j`` of image ``b`` is the mean over the columns ``token_groups[b][j]`` (positions in the T columns) of the
      (refined) column maps. Returns ``Q = max_b len(token_groups[b])``; a missing or empty group gives a zero map
      marked invalid.
    - ``mode="head"`` (class-agnostic masks, the paper's SA-1B run): every (head, column) map is a candidate,
      head-major (``q = head * T' + column``), ``Q = H * T'``; with head-mean input ``Q = T'``. ``columns`` keeps
      only those text columns (``T' = len(columns)``; default all, as the paper's code).

    refine: optional module on ``[K, 1, h, w]`` column maps (:class:`ResidualMapHead`), applied before grouping,
    as the paper's code. Returns ``(candidates [B, Q, h, w], valid [B, Q] bool)``; gradients flow to ``i2t``.
    """
    if i2t.dim() not in (3, 4):
        raise ValueError(f"i2t must be [B, H, N_img, T] or [B, N_img, T], got shape {tuple(i2t.shape)}")
    B = i2t.shape[0]
    if mode == "head":
        if columns is not None:
            cols = torch.as_tensor(list(columns), dtype=torch.long, device=i2t.device)
            if cols.numel() == 0 or int(cols.min()) < 0 or int(cols.max()) >= i2t.shape[-1]:
                raise ValueError(f"columns must be non-empty positions in [0, {i2t.shape[-1]}), got {list(columns)}")
            i2t = i2t.index_select(-1, cols)
        maps = _refine(_to_grid(i2t, grid), refine)  # [B, (H,) T', h, w]
        cand = maps.reshape(B, -1, *maps.shape[-2:])
        return cand, torch.ones(cand.shape[:2], dtype=torch.bool, device=cand.device)
    if mode != "token":
        raise ValueError(f"mode must be 'token' or 'head', got {mode!r}")
    if token_groups is None or len(token_groups) != B:
        raise ValueError(f"mode='token' needs token_groups: one list of column groups per image ({B} images), "
                         f"got {None if token_groups is None else len(token_groups)}")
    if i2t.dim() == 4:
        i2t = i2t.mean(1)
    T = i2t.shape[-1]
    Q = max((len(g) for g in token_groups), default=0)
    h, w = int(grid[0]), int(grid[1])
    cand = i2t.new_zeros(B, Q, h, w)
    valid = torch.zeros(B, Q, dtype=torch.bool, device=i2t.device)
    used = sorted({c for groups in token_groups for g in groups for c in g})
    if not used:
        return cand + 0 * i2t.sum(), valid  # keeps the graph: backward works on an all-empty batch
    if used[0] < 0 or used[-1] >= T:
        raise ValueError(f"token_groups hold columns outside [0, {T}): {[c for c in used if c < 0 or c >= T]}")
    where = {c: k for k, c in enumerate(used)}
    col = torch.as_tensor(used, dtype=torch.long, device=i2t.device)
    maps = _refine(_to_grid(i2t.index_select(-1, col), grid), refine)  # [B, len(used), h, w]
    rows = []
    for b, groups in enumerate(token_groups):
        per = []
        for j in range(Q):
            g = list(groups[j]) if j < len(groups) else []
            if g:
                per.append(maps[b, [where[c] for c in g]].mean(0))
                valid[b, j] = True
            else:
                per.append(maps.new_zeros(h, w))
        rows.append(torch.stack(per))
    return torch.stack(rows), valid


class MaskAlignmentLoss(nn.Module):
    """MAGNET's mask loss: match candidate maps to ground-truth masks, then focal + dice on the pairs.

    ``forward(candidates [B, Q, h, w] logits, targets: list of B tensors [M_b, H_m, W_m] (bool or {0, 1}),
    valid [B, Q] bool or None, matching=None) -> dict(loss, focal, dice, matched, pairs)``.

    - ``matching="hungarian"`` (SA-1B path): cost ``cost_focal * focal + cost_dice * dice`` at the grid (masks
      downsampled nearest), one-to-one, invalid candidates excluded. ``"index"`` (COCO path): candidate ``j`` <->
      mask ``j`` for every valid ``j < M_b`` (:func:`candidates_from_maps` token mode lists candidates in mask
      order). The constructor's ``matching`` is the default; ``forward(..., matching=)`` overrides it.
    - Loss at mask resolution: matched candidates upsampled bilinearly to ``(H_m, W_m)``. ``focal`` and ``dice`` are
      summed over pairs and divided by ``num_masks`` (default: the number of pairs in the batch, at least 1; under
      data parallelism the official SA-1B path passes the all-reduced mean, its COCO path the process's own
      count). ``loss = focal_weight * focal +
      dice_weight * dice``. Computed in float32 whatever the candidates' dtype.
    - ``cost_thresh`` (Hungarian only; None: off, the official default): after matching, the pair of every mask whose
      mean cost over the image's valid candidates is not below it is dropped (the official ``COST_THRESH``, see the
      module docstring; the official code runs it only for one image with one mask).
    - ``pairs``: list of B ``(rows, cols)`` int64 arrays; ``matched``: their total length. Masks without a partner
      (no valid candidate, or dropped by ``cost_thresh``) and candidates without a mask get no loss (the code's "no
      object" has no mask term). ``forward(..., pairs=)`` takes pairs from :meth:`match` instead of matching again.
    """

    def __init__(self, focal_weight: float = 0.1, dice_weight: float = 0.2, alpha: float = 0.25, gamma: float = 2.0,
                 focal_modulation: str = "logits", cost_focal: float = 0.02, cost_dice: float = 1.0,
                 matching: str = "hungarian", cost_thresh: Optional[float] = None):
        super().__init__()
        if focal_modulation not in _MODULATIONS:
            raise ValueError(f"focal_modulation must be one of {_MODULATIONS}, got {focal_modulation!r}")
        self._check_matching(matching)
        if cost_thresh is not None and (isinstance(cost_thresh, bool) or not isinstance(cost_thresh, (int, float))
                                        or not math.isfinite(cost_thresh) or cost_thresh <= 0):
            raise ValueError(f"cost_thresh must be None (off) or a finite number > 0, got {cost_thresh!r}")
        if cost_thresh is not None and matching != "hungarian":
            raise ValueError("cost_thresh filters Hungarian matches; index matching (the COCO path) has no cost")
        self.cost_thresh = None if cost_thresh is None else float(cost_thresh)
        self.focal_weight, self.dice_weight = float(focal_weight), float(dice_weight)
        self.alpha, self.gamma, self.focal_modulation = float(alpha), float(gamma), focal_modulation
        self.cost_focal, self.cost_dice, self.matching = float(cost_focal), float(cost_dice), matching

    @staticmethod
    def _check_matching(matching):
        if matching not in ("hungarian", "index"):
            raise ValueError(f"matching must be 'hungarian' or 'index', got {matching!r}")

    def _check(self, candidates, targets, valid):
        if not isinstance(candidates, torch.Tensor) or candidates.dim() != 4:
            raise ValueError("candidates must be a [B, Q, h, w] tensor, got "
                             f"{tuple(candidates.shape) if isinstance(candidates, torch.Tensor) else type(candidates)}")
        B, Q = candidates.shape[:2]
        if len(targets) != B:
            raise ValueError(f"targets must hold one mask tensor per image: {B} images, got {len(targets)}")
        for b, t in enumerate(targets):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"targets[{b}] must be an [M, H, W] tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if valid is not None and tuple(valid.shape) != (B, Q):
            raise ValueError(f"valid must be [B, Q] = {(B, Q)}, got {tuple(valid.shape)}")

    @torch.no_grad()
    def match(self, candidates: torch.Tensor, targets: List[torch.Tensor], valid: Optional[torch.Tensor] = None,
              matching: Optional[str] = None) -> List[Tuple[np.ndarray, np.ndarray]]:
        """The ``(rows, cols)`` pairs of each image (see the class docstring)."""
        matching = matching or self.matching
        self._check_matching(matching)
        if matching == "index" and self.cost_thresh is not None:
            raise ValueError("cost_thresh filters Hungarian matches; index matching (the COCO path) has no cost")
        pairs = []
        for b, tgt in enumerate(targets):
            Q, M = candidates.shape[1], tgt.shape[0]
            ok = torch.ones(Q, dtype=torch.bool) if valid is None else valid[b].cpu()
            if matching == "index":
                rows = np.array([j for j in range(min(Q, M)) if ok[j]], np.int64)
                pairs.append((rows, rows.copy()))
                continue
            idx = torch.nonzero(ok).flatten()
            if M == 0 or idx.numel() == 0:
                pairs.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                continue
            logits = candidates[b, idx.to(candidates.device)].float().flatten(1)  # [Q', h*w]
            small = F.interpolate(tgt[:, None].float(), size=candidates.shape[-2:], mode="nearest")[:, 0].flatten(1)
            cost = (self.cost_focal * pairwise_focal_cost(logits, small.to(logits.device), self.alpha, self.gamma,
                                                          self.focal_modulation)
                    + self.cost_dice * pairwise_dice_cost(logits, small.to(logits.device)))
            r, c = hungarian_match(cost)
            if self.cost_thresh is not None:  # the official C.mean(0) < cost_thresh: a mask's mean over candidates
                keep = (cost.double().mean(0) < self.cost_thresh).cpu().numpy()[c]
                r, c = r[keep], c[keep]
            pairs.append((idx.numpy()[r].astype(np.int64), c))
        return pairs

    def forward(self, candidates: torch.Tensor, targets: List[torch.Tensor], valid: Optional[torch.Tensor] = None,
                matching: Optional[str] = None, num_masks: Optional[float] = None,
                pairs: Optional[List[Tuple[np.ndarray, np.ndarray]]] = None) -> dict:
        self._check(candidates, targets, valid)
        if pairs is None:
            pairs = self.match(candidates, targets, valid, matching)
        elif len(pairs) != len(targets):
            raise ValueError(f"pairs must hold one (rows, cols) per image: {len(targets)} images, got {len(pairs)}")
        matched = sum(len(r) for r, _ in pairs)
        focal = candidates.new_zeros((), dtype=torch.float32) + 0 * candidates.float().sum()  # keeps the graph
        dice = focal.clone()
        for b, (rows, cols) in enumerate(pairs):
            if len(rows) == 0:
                continue
            tgt = targets[b][torch.as_tensor(cols, device=targets[b].device)].to(candidates.device, torch.float32)
            src = candidates[b, torch.as_tensor(rows, device=candidates.device)].float()[:, None]
            src = F.interpolate(src, size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            src, tgt = src.flatten(1), tgt.flatten(1)
            focal = focal + sigmoid_focal_loss(src, tgt, self.alpha, self.gamma, self.focal_modulation).sum()
            dice = dice + dice_loss(src, tgt).sum()
        n = max(float(matched if num_masks is None else num_masks), 1.0)
        focal, dice = focal / n, dice / n
        return dict(loss=self.focal_weight * focal + self.dice_weight * dice, focal=focal, dice=dice,
                    matched=int(matched), pairs=pairs)
