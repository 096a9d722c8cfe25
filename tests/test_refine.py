"""Self-attention refinement: the recorded affinities equal an independent computation from forward hooks, and
refined maps equal A^p m computed by hand; errors name the fix."""

import numpy as np
import pytest
import torch
from conftest import generate

from opendaam.attention import upsample
from opendaam.heatmaps import heatmaps
from opendaam.refine import affinity, refine
from opendaam.tracing import trace

PROMPT = "a red car in a city"


def _reference_affinities(pipe, names, **kwargs):
    """Head-mean softmax(q k^T / sqrt(d)) of the conditional half, summed over steps, from forward hooks."""
    modules = dict(pipe.unet.named_modules())
    sums = {}

    def hook(name):
        def fn(module, args, kwargs_, output):
            h = args[0]
            h = h[h.shape[0] // 2 :]  # conditional half of the guidance batch
            q = module.to_q(h).view(h.shape[0], h.shape[1], module.heads, -1).transpose(1, 2)
            k = module.to_k(h).view(h.shape[0], h.shape[1], module.heads, -1).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)  # (n, N, N)
            sums[name] = sums.get(name, 0) + probs.detach()
        return fn

    handles = [modules[n.removesuffix(".processor")].register_forward_hook(hook(n), with_kwargs=True) for n in names]
    try:
        images = generate(pipe, prompt=PROMPT, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return images, sums


def test_affinities_and_refinement_equal_an_independent_computation(tiny_pipe):
    kwargs = dict(num_inference_steps=3, height=32, width=48)
    with trace(tiny_pipe, self_attention=("up_blocks.1",)) as tracer:
        traced = generate(tiny_pipe, prompt=PROMPT, **kwargs)
    record = tracer.records[0]
    names = list(record.self_attention)
    assert names and all("up_blocks.1" in n and "attn1" in n for n in names)
    images, reference = _reference_affinities(tiny_pipe, names, **kwargs)
    assert np.array_equal(images, traced)
    for name in names:
        assert torch.allclose(record.self_attention[name], reference[name][0], atol=1e-5), name
    a, grid = affinity(record)
    assert grid == (16, 24) and torch.allclose(a.sum(1), torch.ones(a.shape[0]), atol=1e-5)
    maps = heatmaps(record, ["car", "red"])
    by_hand = maps.latent.reshape(2, -1)  # the up_blocks.1 grid is the latent's here
    expected = sum(reference[n][0] for n in names) / (len(names) * 3)
    for _ in range(2):
        by_hand = by_hand @ expected.T
    refined = refine(record, maps, power=2)
    assert torch.allclose(refined.latent, upsample(by_hand.reshape(2, 16, 24), (16, 24)), atol=1e-5)
    assert refined.labels == ["car", "red"] and not torch.allclose(refined.latent, maps.latent)


def test_refinement_errors(tiny_pipe):
    with trace(tiny_pipe) as tracer:
        generate(tiny_pipe, prompt=PROMPT)
    record = tracer.records[0]
    with pytest.raises(ValueError, match="trace with opendaam.trace\\(pipe, self_attention="):
        refine(record, heatmaps(record, "car"))
    with trace(tiny_pipe, self_attention=("down_blocks", "up_blocks")) as tracer:
        generate(tiny_pipe, prompt=PROMPT)
    record = tracer.records[0]
    with pytest.raises(ValueError, match="different grids"):
        refine(record, heatmaps(record, "car"))
    assert refine(record, heatmaps(record, "car"), layers="up_blocks.1").latent.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="power must be a positive number"):
        refine(record, heatmaps(record, "car"), power=0, layers="up_blocks.1")
    with pytest.raises(ValueError, match="unknown layer 'upper'"):
        with trace(tiny_pipe, self_attention=("upper",)):
            pass


def test_otsu_and_adaptive_labels():
    """Otsu's threshold equals a brute-force search of the between-class variance on the same histogram; the
    adaptive label map ignores a contested pixel and pixels inside the uncertain band."""
    from opendaam.dataset.labels import IGNORE, adaptive_label_map, otsu_threshold

    rng = np.random.default_rng(0)
    values = np.clip(np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.7, 0.1, 200)]), 0, 1)
    counts, edges = np.histogram(values, bins=64, range=(0, 1))
    centers = (edges[:-1] + edges[1:]) / 2

    def between(k):  # classes: bins 0..k and k+1..63
        w0, w1 = counts[: k + 1].sum(), counts[k + 1 :].sum()
        if not w0 or not w1:
            return -1.0
        m0 = (counts[: k + 1] * centers[: k + 1]).sum() / w0
        m1 = (counts[k + 1 :] * centers[k + 1 :]).sum() / w1
        return w0 * w1 * (m0 - m1) ** 2

    best = max(range(63), key=between)
    assert otsu_threshold(values) == pytest.approx(edges[best + 1])
    scores = np.stack([np.tile(np.linspace(0, 1, 11), (2, 1)), np.tile(np.linspace(1, 0, 11), (2, 1))])
    labels = adaptive_label_map(scores, [3, 5], margin=0.2, min_gap=0.1)
    assert labels[0, 0] == 5 and labels[0, -1] == 3 and labels[0, 5] == IGNORE  # 0.5 vs 0.5: contested
