"""PixArt: new words through T5 and the caption projection, with the padding mask, for open_vocab, linear, token
optimization and nearest words, against explicit computations; MM-DiT refuses new text with a clear error."""

import pytest
import torch

from opendaam._tiny import build_tiny_pipeline
from opendaam.attention import upsample
from opendaam.heatmaps import encode_text, heatmaps
from opendaam.optimize import OptimizeConfig, nearest_words, optimize_token
from opendaam.tracing import trace

PROMPT = "a red car on a street"
CALL = dict(num_inference_steps=2, height=32, width=48, output_type="np", use_resolution_binning=False,
            clean_caption=False)


@pytest.fixture(scope="module")
def pixart():
    pipe = build_tiny_pipeline("pixart-alpha", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def record(pixart):
    with trace(pixart, queries=True, query_dtype="float32") as tracer:
        pixart(PROMPT, generator=torch.Generator().manual_seed(0), **CALL)
    return tracer.records[0]


def _layer_context(pipe, text):
    """T5 states of ``text`` through the caption projection, and the padding bias, as the pipeline makes them."""
    embeds, mask, _, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, device="cpu",
                                            clean_caption=False, max_sequence_length=120)
    states = pipe.transformer.caption_projection(embeds)[0].detach()  # (120, inner)
    return states, (1 - mask[0].float()) * -10000.0


def _explicit(record, pipe, states, bias, column):
    modules = dict(pipe.transformer.named_modules())
    total = torch.zeros(record.latent_size)
    for name, info in record.layers.items():
        attn = modules[name.removesuffix(".processor")]
        k = attn.to_k(states).detach().view(-1, info.heads, info.head_dim).transpose(0, 1)  # (heads, T, d)
        q = record.queries[name].float()  # (steps, heads, N, d)
        scores = torch.einsum("shnd,htd->shnt", q, k) * info.scale + bias
        per_pixel = scores.softmax(-1)[..., column].sum((0, 1))
        total += upsample(per_pixel.view(1, info.height, info.width), record.latent_size)[0]
    return total


def test_context_and_mask_recorded(pixart, record):
    states, bias = _layer_context(pixart, PROMPT)
    assert torch.allclose(record.context, states, atol=1e-6)  # the pipeline projects a batch of two
    assert record.meta["text_mask"] == (bias == 0).int().tolist()
    assert torch.allclose(encode_text(pixart, PROMPT, 120)[0], states, atol=1e-6)


def test_open_vocab_respects_the_mask(pixart, record):
    words = ["red", "car", "street"]
    daam = heatmaps(record, words).latent
    assert torch.allclose(heatmaps(record, words, "open_vocab", pipe=pixart).latent, daam, atol=1e-5)
    states, bias = _layer_context(pixart, f"{PROMPT}, tree")
    tokens = encode_text(pixart, f"{PROMPT}, tree")[1]
    column = tokens.index("\u2581tree")
    got = heatmaps(record, "tree", "open_vocab", pipe=pixart).latent[0]
    assert torch.allclose(got, _explicit(record, pixart, states, bias, column), rtol=1e-4, atol=1e-5)
    unmasked = _explicit(record, pixart, states, torch.zeros_like(bias), column)
    assert not torch.allclose(got, unmasked, rtol=1e-3)  # the mask matters here


def test_linear_optimization_and_nearest_words(pixart, record):
    states, _ = _layer_context(pixart, "tree")
    x = states[0]  # "▁tree", first column
    linear = heatmaps(record, "tree", method="linear", pipe=pixart).latent[0]
    modules = dict(pixart.transformer.named_modules())
    explicit = torch.zeros(record.latent_size)
    for name, info in record.layers.items():  # sum over steps and heads of q . (W_k x + b), no softmax
        k = modules[name.removesuffix(".processor")].to_k(x).detach().view(info.heads, info.head_dim)
        per_pixel = torch.einsum("shnd,hd->n", record.queries[name].float(), k)
        explicit += upsample(per_pixel.view(1, info.height, info.width), record.latent_size)[0]
    assert torch.allclose(linear, explicit, rtol=1e-4, atol=1e-4)
    assert record.linear_bias is not None  # PixArt's keys have a bias: the map is M x + c
    assert torch.allclose(linear.flatten(), record.linear_map @ x + record.linear_bias, rtol=1e-4, atol=1e-4)
    target = heatmaps(record, "car").normalized(size="latent")[0] >= 0.5
    for method in ("linear", "open_vocab"):
        token = optimize_token([record], [target], init="car", pipe=pixart,
                               config=OptimizeConfig(method=method, epochs=3, progress=False))
        assert token.embedding.shape[-1] == record.context.shape[-1]
    best = nearest_words(encode_text(pixart, "car")[0][0], pixart, k=2, vocabulary=["tree", "car", "person"])
    assert best[0][0] == "car" and best[0][1] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_refuses_new_text(family):
    pipe = build_tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    with trace(pipe, queries=True) as tracer:
        pipe("a red car", num_inference_steps=2, height=32, width=32, output_type="np")
    with pytest.raises(ValueError, match="open-vocabulary and linear maps of new text are not available for joint"):
        heatmaps(tracer.records[0], "tree", "open_vocab", pipe=pipe)
