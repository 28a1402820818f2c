"""MAGNET mask loss: matching, focal/dice against direct float64 formulas, gradients, candidates, empty targets."""
import itertools
import math

import numpy as np
import pytest
import torch

from seg4diff_fast.magnet.criterion import (MaskAlignmentLoss, ResidualMapHead, candidates_from_maps, dice_loss,
                                            hungarian_match, pairwise_dice_cost, pairwise_focal_cost,
                                            sigmoid_focal_loss)


@pytest.mark.parametrize("q,m,seed", [(3, 3, 0), (5, 3, 1), (4, 2, 2), (6, 4, 3), (2, 5, 4)])
def test_hungarian_equals_brute_force(q, m, seed):
    cost = np.random.default_rng(seed).normal(size=(q, m))
    rows, cols = hungarian_match(torch.from_numpy(cost))
    assert len(rows) == len(cols) == min(q, m) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
    best = math.inf
    if q >= m:  # every injective map masks -> candidates
        for perm in itertools.permutations(range(q), m):
            best = min(best, sum(cost[perm[j], j] for j in range(m)))
    else:
        for perm in itertools.permutations(range(m), q):
            best = min(best, sum(cost[i, perm[i]] for i in range(q)))
    assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-12)


def test_hungarian_rejects_bad_cost():
    with pytest.raises(ValueError, match="NaN or inf"):
        hungarian_match(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\[Q, M\]"):
        hungarian_match(torch.zeros(3))


def _focal64(x, t, alpha, gamma, modulation):
    """Direct float64 formula, pixel by pixel."""
    out = np.zeros(x.shape[0])
    for k in range(x.shape[0]):
        acc = 0.0
        for xi, ti in zip(x[k], t[k]):
            p = 1 / (1 + math.exp(-xi)) if modulation == "sigmoid" else xi
            bce = -(ti * math.log(1 / (1 + math.exp(-xi))) + (1 - ti) * math.log(1 - 1 / (1 + math.exp(-xi))))
            p_t = p * ti + (1 - p) * (1 - ti)
            a_t = alpha * ti + (1 - alpha) * (1 - ti)
            acc += a_t * bce * (1 - p_t) ** gamma
        out[k] = acc / x.shape[1]
    return out


def _dice64(x, t):
    s = 1 / (1 + np.exp(-x))
    return 1 - (2 * (s * t).sum(1) + 1) / (s.sum(1) + t.sum(1) + 1)


@pytest.mark.parametrize("modulation", ["logits", "sigmoid"])
def test_focal_and_dice_match_float64_formula(modulation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, generator=g) * 3
    t = (torch.rand(5, 37, generator=g) > 0.6).float()
    ref_f = _focal64(x.double().numpy(), t.double().numpy(), 0.25, 2.0, modulation)
    ref_d = _dice64(x.double().numpy(), t.double().numpy())
    np.testing.assert_allclose(sigmoid_focal_loss(x, t, 0.25, 2.0, modulation).numpy(), ref_f, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(dice_loss(x, t).numpy(), ref_d, rtol=2e-6, atol=1e-7)
    # pairwise costs are the same losses for every (candidate, mask) pair
    tm = (torch.rand(3, 37, generator=g) > 0.5).float()
    pf, pd = pairwise_focal_cost(x, tm, modulation=modulation), pairwise_dice_cost(x, tm)
    for i, j in itertools.product(range(5), range(3)):
        ref = _focal64(x[i:i + 1].double().numpy(), tm[j:j + 1].double().numpy(), 0.25, 2.0, modulation)[0]
        assert pf[i, j].item() == pytest.approx(ref, rel=2e-5, abs=1e-7)
        assert pd[i, j].item() == pytest.approx(_dice64(x[i:i + 1].double().numpy(), tm[j:j + 1].double().numpy())[0],
                                                rel=2e-6, abs=1e-7)


def _blobs(n, h, w, seed):
    """n disjoint random rectangles-ish masks on an h x w grid."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, n, (h // 3 + 1, w // 3 + 1), generator=g)
    lab = lab.repeat_interleave(3, 0).repeat_interleave(3, 1)[:h, :w]
    return torch.stack([lab == k for k in range(n)])


def test_loss_gradients_flow_to_maps_and_are_finite():
    torch.manual_seed(0)
    h, w = 5, 7
    i2t = torch.randn(2, 3, h * w, 6, dtype=torch.float64, requires_grad=True)
    cand, valid = candidates_from_maps(i2t, (h, w), "head")
    targets = [_blobs(3, 15, 21, 1), _blobs(2, 10, 14, 2)]  # masks at a higher resolution than the grid
    out = MaskAlignmentLoss()(cand, targets, valid)
    assert out["matched"] == 5 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(i2t.grad).all() and i2t.grad.abs().sum() > 0
    # only matched (head, column) maps receive gradient
    touched = (i2t.grad.abs().sum(2) > 0).reshape(2, -1)
    for b, (rows, _) in enumerate(out["pairs"]):
        assert set(torch.nonzero(touched[b]).flatten().tolist()) == set(rows.tolist())


def test_aligned_candidates_beat_shuffled_ones():
    h, w = 8, 8
    masks = _blobs(3, h, w, 5)
    good = (masks.float() * 8 - 4)[None]  # logits +4 inside, -4 outside
    shuffled = good[:, torch.tensor([1, 2, 0])]
    crit = MaskAlignmentLoss(matching="index")
    assert crit(good, [masks])["loss"] < crit(shuffled, [masks])["loss"]
    # Hungarian matching undoes the shuffle
    hung = MaskAlignmentLoss(matching="hungarian")
    assert hung(shuffled, [masks])["loss"].item() == pytest.approx(crit(good, [masks])["loss"].item(), rel=1e-6)
    assert hung(shuffled, [masks])["pairs"][0][0].tolist() == [0, 1, 2]
    assert hung(shuffled, [masks])["pairs"][0][1].tolist() == [1, 2, 0]  # candidate k is mask perm[k]


def test_matching_cost_is_the_papers_at_grid_resolution():
    """cost = 0.02 focal + 1.0 dice with masks nearest-downsampled to the grid: check one pair by hand."""
    g = torch.Generator().manual_seed(3)
    cand = torch.randn(1, 4, 4, 4, generator=g)
    masks = _blobs(2, 8, 8, 7)
    crit = MaskAlignmentLoss()
    small = masks[:, ::2, ::2].float().flatten(1)  # nearest 8 -> 4 picks even pixels
    cost = 0.02 * pairwise_focal_cost(cand[0].flatten(1), small) + pairwise_dice_cost(cand[0].flatten(1), small)
    rows, cols = hungarian_match(cost)
    got = crit.match(cand, [masks])[0]
    assert got[0].tolist() == rows.tolist() and got[1].tolist() == cols.tolist()


def test_empty_targets_and_invalid_candidates():
    cand = torch.randn(3, 4, 5, 5, requires_grad=True)
    targets = [torch.zeros(0, 10, 10, dtype=torch.bool), _blobs(2, 10, 10, 1), torch.zeros(0, 10, 10)]
    out = MaskAlignmentLoss()(cand, targets)
    assert out["matched"] == 2 and [len(r) for r, _ in out["pairs"]] == [0, 2, 0]
    out["loss"].backward()
    assert cand.grad[0].abs().sum() == 0 and cand.grad[2].abs().sum() == 0 and cand.grad[1].abs().sum() > 0
    # all empty: zero loss that still backpropagates
    cand.grad = None
    out = MaskAlignmentLoss()(cand, [torch.zeros(0, 10, 10)] * 3)
    assert out["matched"] == 0 and out["loss"].item() == 0
    out["loss"].backward()
    assert cand.grad is not None and cand.grad.abs().sum() == 0
    # invalid candidates are never matched
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1, :3] = False
    out = MaskAlignmentLoss()(cand.detach(), targets, valid)
    assert out["pairs"][1][0].tolist() == [3] and out["matched"] == 1
    idx = MaskAlignmentLoss(matching="index")(cand.detach(), targets, valid)
    assert idx["matched"] == 0  # masks 0 and 1 have no valid candidate


def test_token_candidates_are_group_means_and_head_means():
    g = torch.Generator().manual_seed(0)
    h, w = 3, 4
    i2t = torch.randn(2, 5, h * w, 9, generator=g, dtype=torch.float64)
    groups = [[[1, 2], [4]], [[3, 5, 6]]]
    cand, valid = candidates_from_maps(i2t, (h, w), "token", token_groups=groups)
    assert cand.shape == (2, 2, h, w) and valid.tolist() == [[True, True], [True, False]]
    mean = i2t.mean(1)
    torch.testing.assert_close(cand[0, 0], mean[0][:, [1, 2]].mean(1).reshape(h, w))
    torch.testing.assert_close(cand[0, 1], mean[0][:, 4].reshape(h, w))
    torch.testing.assert_close(cand[1, 0], mean[1][:, [3, 5, 6]].mean(1).reshape(h, w))
    assert cand[1, 1].abs().sum() == 0
    # head mode: head-major (head, column) candidates, row-major grid
    cand, valid = candidates_from_maps(i2t, (h, w), "head", columns=[0, 2])
    assert cand.shape == (2, 10, h, w) and valid.all()
    torch.testing.assert_close(cand[1, 2 * 3 + 1], i2t[1, 3, :, 2].reshape(h, w))


def test_refine_head_runs_per_column_before_grouping():
    torch.manual_seed(0)
    head = ResidualMapHead(width=4).double()
    i2t = torch.randn(1, 6, 5, dtype=torch.float64)  # [B, N_img, T], grid 2 x 3
    cand, _ = candidates_from_maps(i2t, (2, 3), "token", token_groups=[[[0, 3]]], refine=head)
    cols = i2t[0].T.reshape(5, 1, 2, 3)
    torch.testing.assert_close(cand[0, 0], head(cols[[0, 3]]).mean(0)[0])


def test_bad_inputs_name_the_argument():
    crit = MaskAlignmentLoss()
    with pytest.raises(ValueError, match="candidates"):
        crit(torch.zeros(2, 3, 4), [])
    with pytest.raises(ValueError, match="one mask tensor per image"):
        crit(torch.zeros(2, 3, 4, 4), [torch.zeros(1, 4, 4)])
    with pytest.raises(ValueError, match="focal_modulation"):
        MaskAlignmentLoss(focal_modulation="probs")
    with pytest.raises(ValueError, match="token_groups"):
        candidates_from_maps(torch.zeros(1, 4, 3), (2, 2), "token")
    with pytest.raises(ValueError, match="grid"):
        candidates_from_maps(torch.zeros(1, 5, 3), (2, 2), "head")
    with pytest.raises(ValueError, match="outside"):
        candidates_from_maps(torch.zeros(1, 4, 3), (2, 2), "token", token_groups=[[[3]]])


def _official_cost_thresh_loss(pred, masks, cost_thresh):
    """The official SA-1B mask loss with ``COST_THRESH`` re-stated in float64 torch, line by line
    (``modeling/matcher.py`` memory_efficient_forward, ``modeling/criterion.py`` SetCriterion.forward and
    loss_masks, one process): pred ``[B, Q, h, w]`` logits, masks: list of B ``[M, H, W]``. Returns (focal, dice)
    already divided by num_masks, or raises what the official code raises."""
    import torch.nn.functional as F
    from scipy.optimize import linear_sum_assignment

    outputs = {"pred_logits": torch.ones(pred.shape[0], pred.shape[1], 1, dtype=torch.float64),
               "pred_masks": pred.double()}
    targets = [{"labels": torch.zeros(m.shape[0], dtype=torch.int64), "masks": m.double()} for m in masks]
    indices, valid_mask = [], []
    for b in range(pred.shape[0]):  # the matcher
        out_mask = outputs["pred_masks"][b]
        tgt = F.interpolate(targets[b]["masks"][:, None], size=out_mask.shape[-2:], mode="nearest")[:, 0].flatten(1)
        x = out_mask.flatten(1)
        hw = x.shape[1]
        prob = x  # the official `prob = inputs` overwrite
        pos = (1 - prob) ** 2 * F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none") * 0.25 / hw
        neg = prob ** 2 * F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * 0.75 / hw
        cost_mask = pos @ tgt.T + neg @ (1 - tgt).T
        s = x.sigmoid()
        cost_dice = 1 - (2 * s @ tgt.T + 1) / (s.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
        C = 0.02 * cost_mask + 1.0 * cost_dice
        valid_mask.append(C.mean(0) < cost_thresh)
        i, j = linear_sum_assignment(C.numpy())
        indices.append((torch.as_tensor(i), torch.as_tensor(j)))
    outputs = {k: v[tuple(valid_mask)] for k, v in outputs.items()}  # `v[valid_mask]`, a list read as a tuple
    targets = [t for t, m in zip(targets, valid_mask) if m]
    num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    src_idx = (torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)]),
               torch.cat([s for s, _ in indices]))
    src = outputs["pred_masks"][src_idx]
    tgt = torch.stack([t["masks"] for t in targets])[(torch.cat([torch.full_like(j, i) for i, (_, j) in
                                                                  enumerate(indices)]),
                                                       torch.cat([j for _, j in indices]))]
    src = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0].flatten(1)
    tgt = tgt.flatten(1)
    ce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none")
    p_t = src * tgt + (1 - src) * (1 - tgt)
    focal = ((0.25 * tgt + 0.75 * (1 - tgt)) * ce * (1 - p_t) ** 2).mean(1).sum() / num_masks
    s = src.sigmoid()
    dice = (1 - (2 * (s * tgt).sum(-1) + 1) / (s.sum(-1) + tgt.sum(-1) + 1)).sum() / num_masks
    return float(focal), float(dice)


def test_cost_thresh_with_one_mask_is_the_officials():
    """One image, one mask (the only case the official code runs): a mask whose mean cost over the candidates is
    below the threshold keeps its loss, exactly the official one; above it, the official code raises IndexError
    (it empties the batch, then indexes it), ours drops the pair: no mask loss, nothing matched."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(1, 6, 4, 4, generator=g)
    masks = [(torch.rand(1, 8, 8, generator=g) > 0.5).float()]
    loss = MaskAlignmentLoss()
    cost = loss.cost_focal * pairwise_focal_cost(pred[0].flatten(1), torch.nn.functional.interpolate(
        masks[0][:, None], size=(4, 4), mode="nearest")[:, 0].flatten(1)) + loss.cost_dice * pairwise_dice_cost(
        pred[0].flatten(1), torch.nn.functional.interpolate(masks[0][:, None], size=(4, 4),
                                                            mode="nearest")[:, 0].flatten(1))
    mean = float(cost.double().mean())
    kept = MaskAlignmentLoss(cost_thresh=mean + 1e-3)(pred, masks)
    focal, dice = _official_cost_thresh_loss(pred, masks, mean + 1e-3)
    assert kept["matched"] == 1
    assert float(kept["focal"]) == pytest.approx(focal, rel=1e-5) and float(kept["dice"]) == pytest.approx(dice,
                                                                                                          rel=1e-5)
    plain = MaskAlignmentLoss()(pred, masks)  # kept: the loss without the threshold
    assert float(kept["loss"]) == pytest.approx(float(plain["loss"]), rel=1e-6)
    with pytest.raises(IndexError):
        _official_cost_thresh_loss(pred, masks, mean - 1e-3)
    dropped = MaskAlignmentLoss(cost_thresh=mean - 1e-3)(pred, masks)
    assert dropped["matched"] == 0 and float(dropped["loss"]) == 0.0


def test_cost_thresh_drops_the_pairs_of_costly_masks_in_any_batch():
    """Several images and masks (where the official code raises IndexError): after the Hungarian matching, the pairs
    of the masks whose mean cost over the image's valid candidates is not below the threshold are dropped, the others
    are the unthresholded pairs, and the normaliser counts the pairs kept."""
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 7, 4, 4, generator=g)
    masks = [(torch.rand(3, 8, 8, generator=g) > 0.5).float(), (torch.rand(2, 8, 8, generator=g) > 0.7).float()]
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    with pytest.raises(IndexError):
        _official_cost_thresh_loss(pred, masks, 10.0)
    plain = MaskAlignmentLoss()
    means = []
    for b in range(2):
        ok = valid[b]
        small = torch.nn.functional.interpolate(masks[b][:, None], size=(4, 4), mode="nearest")[:, 0].flatten(1)
        x = pred[b, ok].flatten(1)
        cost = 0.02 * pairwise_focal_cost(x, small) + pairwise_dice_cost(x, small)
        means.append(cost.double().mean(0).numpy())
    thresh = float(np.median(np.concatenate(means)))
    crit = MaskAlignmentLoss(cost_thresh=thresh)
    got, ref = crit.match(pred, masks, valid), plain.match(pred, masks, valid)
    kept = 0
    for b in range(2):
        keep = means[b][ref[b][1]] < thresh
        assert np.array_equal(got[b][0], ref[b][0][keep]) and np.array_equal(got[b][1], ref[b][1][keep])
        kept += int(keep.sum())
    assert 0 < kept < 5
    out = crit(pred, masks, valid)
    direct = plain(pred, masks, valid, pairs=got)
    assert out["matched"] == kept and float(out["loss"]) == pytest.approx(float(direct["loss"]), rel=1e-6)


@pytest.mark.parametrize("kw", [dict(cost_thresh=0.0), dict(cost_thresh=float("nan")), dict(cost_thresh=True),
                                dict(cost_thresh=0.5, matching="index")])
def test_cost_thresh_bad_values_are_refused(kw):
    with pytest.raises(ValueError, match="cost_thresh"):
        MaskAlignmentLoss(**kw)
