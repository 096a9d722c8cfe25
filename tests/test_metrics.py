"""Metrics checked against scikit-learn and plain numpy loops."""

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from opendaam.metrics import (
    auc,
    confusion,
    curve_summary,
    default_thresholds,
    iou_score,
    mean_iou,
    percentile_band,
    threshold_curve,
)


@pytest.fixture()
def random_masks():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 12, 10)).astype(np.float32)
    targets = rng.random((6, 12, 10)) < 0.3
    return torch.from_numpy(maps), torch.from_numpy(targets)


def test_iou_matches_sklearn(random_masks):
    maps, targets = random_masks
    pred = maps >= 0.5
    ours = iou_score(confusion(pred, targets))
    for i in range(len(maps)):
        ref = jaccard_score(targets[i].numpy().ravel(), pred[i].numpy().ravel())
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)


def test_dataset_miou_is_summed_intersection_over_union(random_masks):
    maps, targets = random_masks
    pred = (maps >= 0.3).numpy()
    t = targets.numpy()
    ref = (pred & t).sum() / (pred | t).sum()
    assert mean_iou(confusion(torch.from_numpy(pred), targets), "dataset").item() == pytest.approx(ref)
    per_image = np.mean([(pred[i] & t[i]).sum() / (pred[i] | t[i]).sum() for i in range(len(t))])
    assert mean_iou(confusion(torch.from_numpy(pred), targets)).item() == pytest.approx(per_image)


def test_threshold_curve_matches_loop(random_masks):
    maps, targets = random_masks
    taus = default_thresholds(0.1)
    curve = threshold_curve(maps, targets, taus)
    assert curve.shape == (11, 6, 4)
    for k, tau in enumerate(taus.tolist()):
        for i in range(len(maps)):
            m = maps[i].numpy()
            pred = m >= tau * m.max()
            ref = jaccard_score(targets[i].numpy().ravel(), pred.ravel())
            assert iou_score(curve[k, i]).item() == pytest.approx(ref, abs=1e-6)
    summary = curve_summary(curve, taus)
    values = mean_iou(curve).numpy()
    assert summary["max_miou"] == pytest.approx(values.max())
    assert summary["best_tau"] == pytest.approx(taus[values.argmax()].item())
    assert summary["auc"] == pytest.approx(np.trapezoid(values, taus.numpy()), abs=1e-6)


def test_percentiles_and_auc():
    values = torch.tensor([[0.0, 0.5, 1.0, 0.25]])
    band = percentile_band(values)
    assert band[0].tolist() == pytest.approx(np.percentile(values.numpy(), [5, 95], axis=1).T[0].tolist())
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(0.5)


def test_errors():
    with pytest.raises(ValueError, match=r"prediction \(2, 2\) and mask \(3, 3\) differ"):
        confusion(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction must be"):
        mean_iou(torch.zeros(2, 4), "macro")
