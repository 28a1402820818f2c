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
