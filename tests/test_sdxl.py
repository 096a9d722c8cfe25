"""SDXL: tracing, DAAM against the eager oracle, and new words through both text encoders (open_vocab, linear,
token optimization, nearest words) against explicit computations on a tiny random SDXL pipeline."""

import numpy as np
import pytest
import torch
from family_reference import reference_daam

from opendaam._tiny import build_tiny_pipeline
from opendaam.attention import upsample
from opendaam.heatmaps import encode_text, heatmaps
from opendaam.optimize import OptimizeConfig, nearest_words, optimize_token
from opendaam.tracing import trace

PROMPTS = ["a red car", "a person on a street"]
SIZE = dict(height=32, width=48)  # non-square


@pytest.fixture(scope="module")
def sdxl():
    pipe = build_tiny_pipeline("sdxl", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, prompt, **kwargs):
    options = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **SIZE)
    options.update(kwargs)
    return pipe(prompt, **options).images


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_daam_equals_the_eager_oracle(sdxl, guidance):
    """Two prompts, two images each, guidance on and off: images bit-identical, and every layer's DAAM sums
    equal the oracle's softmax over the text tokens of the conditional rows."""
    kwargs = dict(num_images_per_prompt=2, guidance_scale=guidance)
    plain = _call(sdxl, PROMPTS, **kwargs)
    reference = reference_daam(sdxl, PROMPTS, num_inference_steps=2, output_type="np",
                               generator=torch.Generator().manual_seed(0), **SIZE, **kwargs)
    with trace(sdxl) as tracer:
        traced = _call(sdxl, PROMPTS, **kwargs)
    assert np.array_equal(plain, traced) and np.array_equal(plain, reference.images)
    records = tracer.records
    assert [r.meta["prompt"] for r in records] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert records[0].meta["classifier_free_guidance"] == (guidance > 1)
    assert set(reference.layers) == {name.removesuffix(".processor") for name in records[0].layers}
    for name, info in records[0].layers.items():
        want = reference.layers[name.removesuffix(".processor")]  # (images, pixels, 77)
        assert want.grid == (info.height, info.width)
        for i, record in enumerate(records):
            got = record.daam[name].sum(0)  # (pixels, 77)
            assert torch.allclose(got, want.text_softmax[i], atol=1e-5), name


@pytest.fixture(scope="module")
def record(sdxl):
    with trace(sdxl, queries=True, query_dtype="float32") as tracer:
        _call(sdxl, PROMPTS[0])
    return tracer.records[0]


def test_context_is_both_encoders(sdxl, record):
    width = sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert record.context.shape == (77, width) == (77, sdxl.unet.config.cross_attention_dim)
    states, tokens = encode_text(sdxl, PROMPTS[0])
    assert torch.equal(states, record.context) and tokens == record.tokens


def test_open_vocab_with_the_prompt_equals_daam(sdxl, record):
    words = ["red", "car", "<eot>"]
    assert torch.allclose(heatmaps(record, words, "open_vocab", pipe=sdxl).latent, heatmaps(record, words).latent,
                          atol=1e-5)


def _explicit(record, pipe, x, softmax_context=None, column=None):
    """Sum over layers, steps and heads of q . W_k x (linear), or of the softmax column over the keys of a
    context (open_vocab), each layer upsampled to latent size."""
    modules = {n: m for n, m in pipe.unet.named_modules()}
    total = torch.zeros(record.latent_size)
    for name, info in record.layers.items():
        attn = modules[name.removesuffix(".processor")]
        q = record.queries[name].float()  # (steps, heads, N, head_dim)
        if softmax_context is None:
            k = attn.to_k(x).detach().view(info.heads, info.head_dim)  # (heads, head_dim)
            per_pixel = torch.einsum("shnd,hd->n", q, k)
        else:
            k = attn.to_k(softmax_context).detach().view(77, info.heads, info.head_dim).transpose(0, 1)
            probs = torch.softmax(torch.einsum("shnd,htd->shnt", q, k) * info.scale, dim=-1)
            per_pixel = probs[..., column].sum((0, 1))
        total += upsample(per_pixel.view(1, info.height, info.width), record.latent_size)[0]
    return total


def test_new_words_go_through_both_encoders(sdxl, record):
    tree = sdxl.encode_prompt("tree", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    x = tree[0][0, 1]  # the context row of "tree", as the pipeline builds it (both encoders, penultimate states)
    linear = heatmaps(record, "tree", method="linear", pipe=sdxl).latent[0]
    assert torch.allclose(linear, _explicit(record, sdxl, x), rtol=1e-4, atol=1e-4)
    assert torch.allclose(linear.flatten(), record.linear_map @ x, rtol=1e-4, atol=1e-4)
    context = sdxl.encode_prompt(f"{PROMPTS[0]}, tree", device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0][0]  # (77, text_dim)
    ov = heatmaps(record, "tree", method="open_vocab", pipe=sdxl).latent[0]  # X' = the prompt + ", tree"
    column = record.tokens.index("<|endoftext|>") + 1  # the comma takes the end token's place, then "tree"
    assert torch.allclose(ov, _explicit(record, sdxl, None, context, column), rtol=1e-4, atol=1e-5)


def test_token_optimization_and_nearest_words(sdxl, record):
    """The optimized token is a full-width context vector whose map is M x; nearest words compare context rows
    of both encoders, so a word's own row is nearest to itself."""
    target = heatmaps(record, "car").normalized(size="latent")[0] >= 0.5
    token = optimize_token([record], [target], init="car",
                           config=OptimizeConfig(method="linear", epochs=5, progress=False))
    x = token.embedding[0]
    assert x.shape == (sdxl.unet.config.cross_attention_dim,)
    assert torch.allclose(heatmaps(record, token, method="linear").latent[0].flatten(), record.linear_map @ x,
                          rtol=1e-5, atol=1e-5)
    car = encode_text(sdxl, "car")[0][1]
    best = nearest_words(car, sdxl, k=3, vocabulary=["tree", "car", "person"])
    assert best[0][0] == "car" and best[0][1] == pytest.approx(1.0, abs=1e-5)


def test_query_cache_bytes_counts_every_layer(sdxl):
    """query_cache_bytes from the config alone equals a traced record's fp16 cache (SDXL's transformer depth
    differs per level: every layer is counted)."""
    from opendaam.cache import query_cache_bytes

    with trace(sdxl, queries=True) as tracer:
        _call(sdxl, PROMPTS[0], height=32, width=32)
    record = tracer.records[0]
    calls = len(record.steps)
    factor = sdxl.vae_scale_factor
    assert query_cache_bytes(sdxl.unet.config, 32, 32, calls, vae_scale_factor=factor) == record.nbytes()["queries"]
