"""PixArt-alpha/Sigma, SD3, SD3.5 and Flux: traced images bit-identical, DAAM equal to the eager oracle of
tests/family_reference.py (its own queries and keys with the layers' norms, RoPE and masks), word columns per
tokenizer, guidance routing, and the errors that name the fix."""

import numpy as np
import pytest
import torch
from family_reference import reference_daam

from opendaam._tiny import build_tiny_pipeline
from opendaam.heatmaps import find_tokens, heatmaps
from opendaam.tracing import trace

PROMPTS = ["a red car", "a person on a street"]
FAMILIES = ["pixart-alpha", "pixart-sigma", "sd3", "sd3.5", "flux"]
_PIPES: dict = {}


def pipeline(family):
    if family not in _PIPES:
        pipe = build_tiny_pipeline(family, seed=0)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[family] = pipe
    return _PIPES[family]


def call_options(family, **kwargs):
    options = dict(num_inference_steps=2, height=32, width=48, output_type="np")  # non-square
    if family.startswith("pixart"):
        options.update(use_resolution_binning=False, clean_caption=False)
    options.update(kwargs)
    return options


def run_both(family, prompts=PROMPTS, trace_options=None, **kwargs):
    """The oracle's maps and the tracer's records of the same call (same seed)."""
    pipe = pipeline(family)
    options = call_options(family, **kwargs)
    plain = pipe(prompts, generator=torch.Generator().manual_seed(0), **options).images
    reference = reference_daam(pipe, prompts, generator=torch.Generator().manual_seed(0), **options)
    with trace(pipe, **(trace_options or {})) as tracer:
        traced = pipe(prompts, generator=torch.Generator().manual_seed(0), **options).images
    assert np.array_equal(plain, traced) and np.array_equal(plain, reference.images)
    return reference, tracer.records


def assert_daam_equal(reference, records, field="text_softmax"):
    assert set(reference.layers) == {name.removesuffix(".processor") for name in records[0].layers}
    for name, info in records[0].layers.items():
        want = reference.layers[name.removesuffix(".processor")]
        assert want.grid == (info.height, info.width), name
        for i, record in enumerate(records):
            got = record.daam[name].sum(0)  # (pixels, T)
            expected = getattr(want, field)[i]
            assert got.shape == expected.shape, name
            assert torch.allclose(got, expected, atol=2e-6 * max(1.0, float(expected.abs().max()))), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_daam_equals_the_eager_oracle(family, guidance):
    """Two prompts, two images each, non-square, guidance on and off (Flux: distilled, no CFG)."""
    reference, records = run_both(family, num_images_per_prompt=2, guidance_scale=guidance)
    assert [r.meta["prompt"] for r in records] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    cfg = guidance > 1 and family != "flux"
    assert all(r.meta["classifier_free_guidance"] == cfg for r in records)
    assert_daam_equal(reference, records)


def test_flux_true_cfg_records_the_conditional_branch():
    """True CFG calls the transformer twice per step, conditional first: only the first call is recorded."""
    reference, records = run_both("flux", num_images_per_prompt=2, true_cfg_scale=2.0,
                                  negative_prompt=["blurry", "dark"])
    assert records[0].meta["calls"] == 2 and records[0].steps == [0, 1]
    assert_daam_equal(reference, records)


@pytest.mark.parametrize("family", ["sd3.5", "flux"])
def test_joint_slice_option(family):
    """joint_slice records the text columns of the model's own softmax over image and text keys."""
    reference, records = run_both(family, prompts=PROMPTS[0], trace_options={"joint_slice": True})
    assert_daam_equal(reference, records, field="joint_slice")
    with pytest.raises(ValueError, match="joint_slice=True reads joint attention"):
        with trace(pipeline("pixart-alpha"), joint_slice=True):
            pass


def test_layers_found_by_type_not_name():
    """SD3.5's image-only attn2 is left out; Flux's single-stream blocks are in; PixArt reads only attn2."""
    for family, included, excluded in (("sd3.5", ".attn.processor", ".attn2."), ("flux", "single_transformer_blocks",
                                                                                   None),
                                       ("pixart-alpha", ".attn2.processor", ".attn1.")):
        with trace(pipeline(family)) as tracer:
            layers = list(tracer.layers)
        assert layers and any(included in n for n in layers), (family, layers)
        if excluded:
            assert not any(excluded in n for n in layers), (family, layers)
    assert any(".attn2" in n for n, _ in pipeline("sd3.5").transformer.named_modules())


def test_pixart_padding_gets_no_attention():
    _, records = run_both("pixart-alpha", prompts=PROMPTS[0])
    record = records[0]
    used = len(record.tokens)  # "a red car</s>": the unmasked columns
    for probs in record.daam.values():  # (heads, N, 120)
        assert probs.shape[-1] == pipeline("pixart-alpha").tokenizer.model_max_length == 120
        assert torch.equal(probs[..., used:], torch.zeros_like(probs[..., used:]))
        steps = len(record.steps)  # DAAM sums each step's probabilities, which add up to 1 over the text
        assert torch.allclose(probs.sum(-1), torch.full_like(probs.sum(-1), float(steps)), atol=1e-5)


def test_word_columns_per_tokenizer():
    """SD3: a word's map pools its CLIP columns and its T5 columns (offset by the CLIP length); Flux and PixArt:
    T5 columns only."""
    _, records = run_both("sd3", prompts=PROMPTS[0])
    record = records[0]
    clip, t5 = record.meta["segments"]
    assert (clip["tokenizer"], clip["offset"], t5["tokenizer"], t5["offset"]) == ("tokenizer", 0, "tokenizer_3", 77)
    columns = find_tokens(clip["tokens"], "car") + [77 + i for i in find_tokens(t5["tokens"], "car")]
    assert heatmaps(record, "car").token_indices == [columns] and columns == [3, 79]
    by_hand = heatmaps(record, [3, 79]).latent  # one map per column
    assert torch.allclose(heatmaps(record, "car").latent[0], by_hand.mean(0))
    _, flux = run_both("flux", prompts=PROMPTS[0])
    assert flux[0].tokens == ["\u2581a", "\u2581red", "\u2581car", "</s>"]
    assert heatmaps(flux[0], "car").token_indices == [[2]]
    with pytest.raises(KeyError, match="no start token"):
        heatmaps(flux[0], "<sot>")


def test_linear_refused_where_keys_are_not_linear():
    for family in ("sd3", "flux"):
        with pytest.raises(ValueError, match="linear maps need keys that are linear in one text context"):
            with trace(pipeline(family), linear=True):
                pass
        with trace(pipeline(family)) as tracer:  # by default: wherever defined
            pass
        assert tracer.config.linear is False


def test_layer_presets():
    """Presets select by structure: Flux's double- and single-stream blocks, ConceptAttention's second half of the
    double-stream blocks, thirds in data-flow order; at trace time and at map time alike."""
    pipe = pipeline("flux")
    with trace(pipe, layers=("single",)) as tracer:
        pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **call_options("flux"))
    single = tracer.records[0]
    assert list(single.layers) == [f"single_transformer_blocks.{i}.attn.processor" for i in range(2)]
    _, (record,) = run_both("flux", prompts=PROMPTS[0])
    assert torch.allclose(heatmaps(record, "car", layers="single").latent, heatmaps(single, "car").latent)
    both = heatmaps(record, "car", layers="double").latent + heatmaps(record, "car", layers="single").latent
    assert torch.allclose(both, heatmaps(record, "car").latent, atol=1e-5)
    assert heatmaps(record, "car", layers="conceptattention").latent.shape == (1, *record.latent_size)
    with pytest.raises(ValueError, match="unknown layer 'seg'; .* presets: early, middle, late, double, single, "
                                         "conceptattention"):
        heatmaps(record, "car", layers="seg")
    unet = {n: None for n in ["down_blocks.0.a", "down_blocks.1.a", "up_blocks.0.a", "up_blocks.1.a", "mid_block.a",
                              "up_blocks.2.a"]}
    from opendaam.tracing.adapters import layer_presets

    assert layer_presets(list(unet))["late"] == ["up_blocks.1.a", "up_blocks.2.a"]


def test_prompts_longer_than_clip_reads():
    """T5 reads prompts past CLIP's 77 tokens: Flux maps a word at T5 column 80+; SD3 cuts its CLIP columns at 77
    (as the pipeline does) and finds the word in its T5 columns."""
    words = " ".join(["red car"] * 45) + " tree"  # 91 words: past 77 tokens in CLIP and in the tiny T5
    prompt = f"a {words}"
    pipe = pipeline("flux")
    with trace(pipe) as tracer:
        pipe(prompt, generator=torch.Generator().manual_seed(0), **call_options("flux"))
    record = tracer.records[0]
    columns = heatmaps(record, "tree").token_indices[0]
    assert record.meta["prompt"] == prompt and columns and min(columns) > 77
    pipe = pipeline("sd3")
    with trace(pipe) as tracer:
        pipe(prompt, generator=torch.Generator().manual_seed(0), **call_options("sd3"))
    clip, t5 = tracer.records[0].meta["segments"]
    assert len(clip["token_ids"]) == 77 and "\u2581tree" in t5["tokens"]
    assert heatmaps(tracer.records[0], "tree").token_indices[0] == [77 + t5["tokens"].index("\u2581tree")]
