"""Open-vocabulary maps in joint attention (SD3, SD3.5, Flux) by replaying recorded steps beside the frozen image
stream: the prompt's own states reproduce the generation's maps in every layer; the image stream stays frozen
whatever the new text; errors name the fix."""

import numpy as np
import pytest
import torch

from opendaam._tiny import build_tiny_pipeline
from opendaam.heatmaps import heatmaps
from opendaam.replay import _frozen_image_stream, encode_prompt_states, replay_daam
from opendaam.tracing import trace

PROMPT = "a red car on a street"
CALL = dict(num_inference_steps=3, height=32, width=48, output_type="np")
_CACHE: dict = {}


def traced(family):
    if family not in _CACHE:
        pipe = build_tiny_pipeline(family, seed=0)
        pipe.set_progress_bar_config(disable=True)
        plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images
        with trace(pipe, replay=True) as tracer:
            images = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images
        assert np.array_equal(plain, images)
        _CACHE[family] = pipe, tracer.records[0]
    return _CACHE[family]


@pytest.mark.parametrize("family", ["sd3", "sd3.5", "flux"])
def test_the_prompt_replayed_reproduces_every_layer(family):
    pipe, record = traced(family)
    assert record.replay["hidden_states"].shape[0] == len(record.steps) == 3
    replayed = replay_daam(record, pipe, record.context)
    assert set(replayed) == set(record.daam)
    for name, probs in record.daam.items():
        assert torch.allclose(replayed[name], probs, atol=1e-6), name
    words = ["red", "car", "street"]
    assert torch.allclose(heatmaps(record, words, "open_vocab", pipe=pipe).latent, heatmaps(record, words).latent,
                          atol=1e-6)
    first = replay_daam(record, pipe, record.context, steps=[0])  # one step: the first step's share only
    assert all((first[n] <= record.daam[n] + 1e-6).all() for n in first)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_image_stream_stays_frozen(family):
    """With another text in the second row, the second row's prediction still equals the first's (the image
    stream never read the new words); without the freeze it does not."""
    pipe, record = traced(family)
    other = encode_prompt_states(pipe, "a green tree", record.context.shape[0])
    text = torch.stack([record.context, other])
    latent = record.replay["hidden_states"][1]
    call = dict(hidden_states=torch.stack([latent, latent]), encoder_hidden_states=text,
                timestep=torch.stack([record.replay["timestep"][1]] * 2), return_dict=False,
                pooled_projections=torch.stack([record.replay["pooled_projections"]] * 2))
    call.update({k: record.replay[k] for k in ("img_ids", "txt_ids") if k in record.replay})
    denoiser = pipe.transformer
    before = dict(denoiser.attn_processors)
    with torch.no_grad():
        free = denoiser(**call)[0]
        with _frozen_image_stream(denoiser, list(record.layers)):
            frozen = denoiser(**call)[0]
    assert not torch.allclose(free[0], free[1])
    assert torch.equal(frozen[0], frozen[1]) and torch.equal(frozen[0], free[0])
    assert all(denoiser.attn_processors[n] is p for n, p in before.items())  # restored


def test_new_words_and_errors():
    pipe, record = traced("sd3")
    tree = heatmaps(record, ["tree", "car"], "open_vocab", pipe=pipe)
    assert tree.labels == ["tree", "car"] and tree.token_indices == [[8, 84], [3, 79]]
    assert torch.isfinite(tree.latent).all() and (tree.latent >= 0).all()
    with pytest.raises(ValueError, match="takes words; embeddings have no text stream"):
        heatmaps(record, torch.zeros(record.context.shape[1]), "open_vocab", pipe=pipe)
    with pytest.raises(ValueError, match="the new text's states are \\(3, 4\\)"):
        replay_daam(record, pipe, torch.zeros(3, 4))
    with trace(pipe) as plain:
        pipe(PROMPT, **CALL)
    with pytest.raises(ValueError, match="trace with opendaam.trace\\(pipe, replay=True\\)"):
        replay_daam(plain.records[0], pipe, record.context)
    with pytest.raises(ValueError, match="replay=True is for joint attention"):
        with trace(build_tiny_pipeline("pixart-alpha"), replay=True):
            pass


@pytest.mark.parametrize("family", ["sd3.5", "flux"])
def test_token_maps_and_optimization_through_the_replay(family):
    """The two-token object map equals p0 / (p0 + p1) of the replayed full-text softmax, step by step and head by
    head; its gradient matches a finite difference; optimization improves the loss."""
    from opendaam.attention import upsample
    from opendaam.optimize import OptimizeConfig, optimize_token
    from opendaam.replay import _empty_prompt, token_maps

    pipe, record = traced(family)
    x = record.context[[3, 5]].clone()  # two prompt columns as the object and background tokens
    maps = token_maps(record, pipe, x)
    text = torch.cat([x, _empty_prompt(pipe, record.context.shape[0])[2:]])
    expected = torch.zeros(record.latent_size).flatten()
    for step in range(len(record.steps)):
        probs = replay_daam(record, pipe, text, steps=[step])
        for name, p in probs.items():  # (heads, N, T)
            info = record.layers[name]
            obj = (p[..., 0] / (p[..., 0] + p[..., 1])).sum(0).view(1, info.height, info.width)
            expected += upsample(obj, record.latent_size).flatten()
    assert torch.allclose(maps[0], expected, rtol=1e-4, atol=1e-4)
    heads = sum(info.heads for info in record.layers.values())
    assert torch.allclose(maps[0] + maps[1], torch.full_like(maps[0], heads * len(record.steps)), rtol=1e-5)
    x = x.requires_grad_(True)
    weights = torch.linspace(-1, 1, maps.shape[1])
    (token_maps(record, pipe, x)[0] @ weights).backward()
    delta = torch.zeros_like(x)
    delta[0, 0] = 1e-2
    with torch.no_grad():
        finite = ((token_maps(record, pipe, x + delta)[0] - token_maps(record, pipe, x - delta)[0]) @ weights) / 2e-2
    assert float(x.grad[0, 0]) == pytest.approx(float(finite), rel=2e-2, abs=1e-3)
    target = heatmaps(record, "car").normalized(size="latent")[0] >= 0.5
    token = optimize_token([record], [target], init="car", pipe=pipe,
                           config=OptimizeConfig(method="open_vocab", epochs=8, progress=False))
    assert token.embedding.shape == (2, record.context.shape[1])
    assert token.history[-1]["loss"] < token.history[0]["loss"]
