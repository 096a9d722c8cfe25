"""Planted solutions: masks thresholded from a known embedding's map are recovered by optimize_token.

A token that reproduces the masks exactly exists (the planted one); the optimizer starts from the word "car"
(elsewhere: its own maps match the masks far worse, asserted) and must reach a max-over-thresholds IoU of
0.95 on the training images and 0.9 on held-out images of the same prompt (issue 16), for the linear and the
open-vocabulary objectives, on two prompts with three training and two held-out images each.
"""

import pytest
import torch
from conftest import generate

from opendaam.heatmaps import heatmaps
from opendaam.metrics import default_thresholds, iou_score, threshold_curve
from opendaam.optimize import OptimizeConfig, optimize_token
from opendaam.tracing import trace

PROMPTS = ("a red car on a street", "a person next to a blue bus")
TRAIN, HELD_OUT = 3, 2


def _records(pipe, prompts, seeds, **call):
    out = {}
    for p, prompt in enumerate(prompts):
        for s in range(seeds):
            with trace(pipe, queries=True) as tracer:
                generate(pipe, prompt=prompt, seed=100 + s, **call)
            out[p, s] = tracer.records[0]
    return out


@pytest.fixture(scope="module")
def tiny_records(tiny_pipe):
    return _records(tiny_pipe, PROMPTS, TRAIN + HELD_OUT, num_inference_steps=3, height=32, width=32)


def _planted(method: str, dim: int, scale: float, seed: int) -> list:
    """A random embedding (linear) or object/background pair (open_vocab) with rows of norm ``scale``."""
    rows = 1 if method == "linear" else 2
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    x = x / x.norm(dim=-1, keepdim=True) * scale
    return [x[0]] if method == "linear" else [x[0:1], x[1:2]]


def _soft(record, token, method, pipe):
    return heatmaps(record, token, method, pipe=pipe).soft[0]  # (H, W) at image size


def max_iou(records, token, masks, method, pipe) -> float:
    """Max over metrics.default_thresholds of the mean IoU of the min-max normalized maps."""
    maps = torch.stack([_soft(r, token, method, pipe) for r in records])
    curve = threshold_curve(maps, torch.stack(masks), default_thresholds(), kind="minmax")  # (T, N, 4)
    return float(iou_score(curve).mean(1).max())


def _check(records, pipe, method, prompt, seed, **options):
    recs = [records[prompt, s] for s in range(TRAIN + HELD_OUT)]
    scale = float(recs[0].context[1:4].norm(dim=-1).mean())  # the size of the prompt's word embeddings
    planted = _planted(method, recs[0].context.shape[1], scale, seed)
    masks = [heatmaps(r, planted[0] if method == "linear" else planted, method, pipe=pipe).normalized("minmax")[0]
             >= 0.5 for r in recs]
    assert all(0.05 < float(m.float().mean()) < 0.95 for m in masks)  # masks, not all or nothing
    train, held = slice(0, TRAIN), slice(TRAIN, None)
    config = OptimizeConfig.fit_masks(method=method, progress=False, **options)  # the planted optimum's options
    token = optimize_token(recs[train], [m.numpy() for m in masks[train]], pipe=pipe, init="car", config=config)
    rows = token.embedding[0] if method == "linear" else [token.embedding[0:1], token.embedding[1:2]]
    got_train = max_iou(recs[train], rows, masks[train], method, pipe)
    got_held = max_iou(recs[held], rows, masks[held], method, pipe)
    car = pipe_word(pipe, "car")
    start = car if method == "linear" else [car[None], torch.zeros_like(car)[None]]
    before = max_iou(recs[train], start, masks[train], method, pipe)
    print(f"{method} prompt {prompt}: start {before:.3f}, train {got_train:.3f}, held-out {got_held:.3f}")
    assert before < 0.9  # the start is elsewhere
    assert got_train >= 0.95
    assert got_held >= 0.9
    assert token.meta["train_max_miou"] == pytest.approx(max(h["train_max_miou"] for h in token.history))


def pipe_word(pipe, word):
    from opendaam.heatmaps import encode_text, find_tokens

    states, tokens = encode_text(pipe, word)
    return states[find_tokens(tokens, word)].mean(0)


@pytest.mark.parametrize("prompt", [0, 1])
def test_planted_linear_token_is_recovered(tiny_records, tiny_pipe, prompt):
    _check(tiny_records, tiny_pipe, "linear", prompt, seed=prompt)  # fit_masks() as it is


@pytest.mark.parametrize("prompt", [0, 1])
def test_planted_open_vocab_token_is_recovered(tiny_records, tiny_pipe, prompt):
    # 300 epochs keep the default suite short (tiny: train 0.98-0.99, held-out 0.95-0.97); the defaults
    # (2000 epochs) run in the slow test below
    _check(tiny_records, tiny_pipe, "open_vocab", prompt, seed=prompt, epochs=300)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [0, 1])
def test_planted_open_vocab_token_is_recovered_with_defaults(tiny_records, tiny_pipe, prompt):
    _check(tiny_records, tiny_pipe, "open_vocab", prompt, seed=prompt)


@pytest.fixture(scope="module")
def toy_urban():
    import opendaam

    pipe = opendaam.load_pipeline("toy-urban")
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 20, "height": 64, "width": 64}  # the model's own defaults (opendaam.json)
    return pipe, _records(pipe, ("a car on a city street", "a person walking in the city"), TRAIN + HELD_OUT, **call)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "open_vocab"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("prompt", [0, 1])
def test_planted_token_is_recovered_on_toy_urban(toy_urban, method, prompt, seed):
    pipe, records = toy_urban
    _check(records, pipe, method, prompt, seed)
