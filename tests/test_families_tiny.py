"""Tiny offline pipelines of every family (opendaam._tiny) and the eager DAAM oracle (family_reference).

The oracle is checked against the models themselves (its probabilities rebuild each layer's output), so tests
of the tracer can trust it.
"""

import numpy as np
import pytest
import torch
from family_reference import attention_inputs, image_attention_output, reference_daam, text_conditioned_layers

from opendaam._tiny import FAMILIES, build_tiny_pipeline, tiny_t5_tokenizer

PROMPTS = ["a red car", "a tree near a house"]
_PIPES = {}


def tiny(family):
    """One pipeline per family for the whole session (building SDXL's takes about a second)."""
    if family not in _PIPES:
        _PIPES[family] = build_tiny_pipeline(family)
    return _PIPES[family]


def call_options(family, seed=0, **changes):
    """Two steps at a non-square size, as every family accepts it."""
    options = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed))
    if family.startswith("pixart"):
        options.update(use_resolution_binning=False, clean_caption=False)
    if family != "sdxl":
        options["max_sequence_length"] = 16
    options.update(changes)
    return options


DENOISER = {
    "sdxl": ("StableDiffusionXLPipeline", "unet"),
    "pixart-alpha": ("PixArtAlphaPipeline", "transformer"),
    "pixart-sigma": ("PixArtSigmaPipeline", "transformer"),
    "sd3": ("StableDiffusion3Pipeline", "transformer"),
    "sd3.5": ("StableDiffusion3Pipeline", "transformer"),
    "flux": ("FluxPipeline", "transformer"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_and_runs_two_steps_non_square(family):
    pipe = tiny(family)
    cls, attribute = DENOISER[family]
    assert type(pipe).__name__ == cls and hasattr(pipe, attribute)
    images = pipe(PROMPTS, height=32, width=48, **call_options(family)).images
    assert images.shape == (2, 32, 48, 3) and np.isfinite(images).all()
    assert not np.array_equal(images[0], images[1])  # the prompt reaches the image


def test_same_seed_same_weights_other_seed_other_weights_caller_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = (build_tiny_pipeline("flux", seed=s).transformer.state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x_embedder.weight"], c["x_embedder.weight"])


def test_sd35_has_dual_attention_and_rms_qk_norm_and_its_image_only_attention_is_not_text_conditioned():
    transformer = tiny("sd3.5").transformer
    assert transformer.config.dual_attention_layers == (0,) and transformer.config.qk_norm == "rms_norm"
    block = transformer.transformer_blocks[0]
    assert type(block.attn.norm_added_k).__name__ == "RMSNorm" and block.attn2.added_kv_proj_dim is None
    assert sorted(text_conditioned_layers(transformer)) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]


def test_flux_layers_include_single_stream_blocks():
    kinds = {name: kind for name, (kind, _) in text_conditioned_layers(tiny("flux").transformer).items()}
    assert kinds == {
        "transformer_blocks.0.attn": "joint_txt_img", "transformer_blocks.1.attn": "joint_txt_img",
        "single_transformer_blocks.0.attn": "single", "single_transformer_blocks.1.attn": "single",
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_from_pretrained_round_trip_offline(family, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = tiny(family)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is type(pipe)
    options = dict(height=32, width=48, num_images_per_prompt=2)
    expected = pipe(PROMPTS, **call_options(family, **options)).images
    np.testing.assert_array_equal(loaded(PROMPTS, **call_options(family, **options)).images, expected)


def test_t5_tokenizer_words_are_single_pieces_and_rare_words_split():
    tok = tiny_t5_tokenizer()
    assert tok.convert_ids_to_tokens(tok("a tree near a house").input_ids) == [
        "▁a", "▁tree", "▁near", "▁a", "▁house", "</s>"
    ]
    pieces = tok.convert_ids_to_tokens(tok("squirrel").input_ids)[:-1]
    assert len(pieces) > 1 and "".join(pieces) == "▁squirrel"
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_bfloat16_build_rounds_the_float32_weights_and_runs(family):
    half = build_tiny_pipeline(family, dtype=torch.bfloat16)
    full = build_tiny_pipeline(family)
    name = "unet" if family == "sdxl" else "transformer"
    a, b = getattr(half, name).state_dict(), getattr(full, name).state_dict()
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k].to(torch.bfloat16)) for k in a)
    assert half.text_encoder.dtype == half.vae.dtype == torch.bfloat16
    images = half(PROMPTS[0], height=32, width=48, **call_options(family)).images
    assert images.shape == (1, 32, 48, 3) and np.isfinite(images).all()


def test_unknown_family_and_config_key_are_named():
    with pytest.raises(ValueError, match="unknown family 'sd4'; choose one of: sdxl, pixart-alpha"):
        build_tiny_pipeline("sd4")
    with pytest.raises(ValueError, match="FluxTransformer2DModel has no config key guidance_embed"):
        build_tiny_pipeline("flux", guidance_embed=True)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch dtype, not torch.int8"):
        build_tiny_pipeline("flux", dtype=torch.int8)


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_probabilities_rebuild_every_text_layer_output(family):
    """The oracle's q, k (norms, RoPE, mask) are the model's: softmax times values gives each layer's image rows."""
    pipe = tiny(family)
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    text_len, errors, handles = {}, {}, []

    def on_denoiser(module, args, kwargs):
        text_len["n"] = kwargs["encoder_hidden_states"].shape[1]

    def on_layer(name, kind):
        def hook(module, args, kwargs, output):
            inputs = attention_inputs(args, kwargs)
            image_rows = output[0] if isinstance(output, tuple) else output
            if kind == "single":
                image_rows = image_rows[:, text_len["n"]:]
            rebuilt = image_attention_output(kind, module, inputs, text_len["n"])
            errors[name] = max(errors.get(name, 0.0), float((rebuilt - image_rows).abs().max()))

        return hook

    handles.append(denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True))
    for name, (kind, module) in text_conditioned_layers(denoiser).items():
        handles.append(module.register_forward_hook(on_layer(name, kind), with_kwargs=True))
    try:
        with torch.no_grad():
            pipe(PROMPTS, height=32, width=48, **call_options(family))
    finally:
        for handle in handles:
            handle.remove()
    assert errors and max(errors.values()) < 5e-6, errors


@pytest.mark.parametrize("family", ["sd3", "sd3.5", "flux"])
def test_text_softmax_times_text_mass_is_the_joint_slice(family):
    ref = reference_daam(
        tiny(family), PROMPTS, height=32, width=48, reduce=False, **call_options(family, num_images_per_prompt=2)
    )
    for name, layer in ref.layers.items():
        assert layer.text_softmax.shape[:2] == (2, 4)  # steps, images (2 prompts x 2): conditional rows only
        torch.testing.assert_close(layer.text_softmax * layer.text_mass[..., None], layer.joint_slice)
        assert 0 < layer.text_mass.min() and layer.text_mass.max() < 1, name  # images take part of the mass
        torch.testing.assert_close(layer.text_softmax.sum(-1), torch.ones_like(layer.text_mass))


@pytest.mark.parametrize("family", ["pixart-alpha", "pixart-sigma"])
def test_pixart_padded_tokens_get_zero(family):
    pipe = tiny(family)
    ref = reference_daam(pipe, PROMPTS, height=32, width=48, **call_options(family, guidance_scale=4.5))
    mask = pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").attention_mask.bool()
    assert mask.sum(1).tolist() == [4, 6]  # "▁a ▁red ▁car </s>" and 5 words + </s>
    for layer in ref.layers.values():
        maps = layer.text_softmax  # (images, pixels, tokens)
        assert (maps[~mask[:, None, :].expand_as(maps)] == 0).all()
        assert (maps[mask[:, None, :].expand_as(maps)] > 0).all()


def test_cfg_conditional_rows_are_the_second_half():
    """With CFG in one batch the oracle keeps the conditional half: the same maps as the prompt's own rows."""
    pipe = tiny("sd3")
    runs = (call_options("sd3", num_inference_steps=1, guidance_scale=scale) for scale in (5.0, 1.0))
    guided, plain = (reference_daam(pipe, PROMPTS, height=32, width=48, **options) for options in runs)
    for name, layer in guided.layers.items():  # first step: same latents, so the conditional maps agree
        torch.testing.assert_close(layer.text_softmax, plain.layers[name].text_softmax)


def test_flux_true_cfg_keeps_the_conditional_call():
    pipe = tiny("flux")

    def run(prompts, **extra):  # a fresh generator per call: the same starting latents
        options = call_options("flux", num_inference_steps=1, **extra)
        return reference_daam(pipe, prompts, height=32, width=48, **options)

    cfg = run(PROMPTS, true_cfg_scale=4.0, negative_prompt=["", ""])
    plain, negative = run(PROMPTS), run(["", ""])
    assert cfg.steps == 1
    name = "single_transformer_blocks.1.attn"
    torch.testing.assert_close(cfg.layers[name].text_softmax, plain.layers[name].text_softmax)
    assert not torch.allclose(cfg.layers[name].text_softmax, negative.layers[name].text_softmax)
    assert not np.array_equal(cfg.images, plain.images)  # the negative branch did steer the image


def test_flux_true_cfg_calls_name_their_branch_in_cache_context():
    """FluxPipeline wraps each transformer call in transformer.cache_context("cond" / "uncond")."""
    import contextlib

    pipe = tiny("flux")
    transformer, names, calls = pipe.transformer, [], []
    original = transformer.cache_context

    @contextlib.contextmanager
    def spy(name, **kwargs):
        names.append(name)
        with original(name, **kwargs):
            yield

    transformer.cache_context = spy  # an instance attribute: the pipeline calls self.transformer.cache_context
    handle = transformer.register_forward_pre_hook(lambda module, args: calls.append(names[-1]))
    try:
        pipe(PROMPTS, true_cfg_scale=3.0, negative_prompt=["", ""], height=32, width=48, **call_options("flux"))
    finally:
        handle.remove()
        del transformer.cache_context
    assert calls == ["cond", "uncond", "cond", "uncond"]


def test_guidance_distilled_flux_runs_and_reads_the_guidance():
    pipe = build_tiny_pipeline("flux", guidance_embeds=True)
    low, high = (pipe(PROMPTS[0], height=32, width=48, **call_options("flux", guidance_scale=g)).images for g in (1, 8))
    assert low.shape == (1, 32, 48, 3) and not np.array_equal(low, high)


class _Forward:
    """A processor wrapper that only forwards its arguments."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, *args, **kwargs):
        return self.inner(attn, *args, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_forwarding_processor_wrapper_changes_nothing(family):
    pipe = tiny(family)
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    expected = pipe(PROMPTS, height=32, width=48, **call_options(family)).images
    original = denoiser.attn_processors
    denoiser.set_attn_processor({name: _Forward(p) for name, p in original.items()})
    try:
        images = pipe(PROMPTS, height=32, width=48, **call_options(family)).images
    finally:
        denoiser.set_attn_processor(original)
    np.testing.assert_array_equal(images, expected)


def test_flux_drops_attention_kwargs_the_processor_signature_does_not_name():
    """FluxAttention filters joint_attention_kwargs by inspect.signature(processor.__call__): **kwargs is not enough."""
    pipe = tiny("flux")
    attn = pipe.transformer.transformer_blocks[0].attn
    seen = []

    class Star(_Forward):
        def __call__(self, attn, *args, **kwargs):
            seen.append(("star", kwargs.get("opendaam_tag")))
            return self.inner(attn, *args)

    class Named(_Forward):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, opendaam_tag=None):
            seen.append(("named", opendaam_tag))
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    original = attn.processor
    try:
        for wrapper in (Star, Named):
            attn.processor = wrapper(original)
            options = call_options("flux", num_inference_steps=1, joint_attention_kwargs={"opendaam_tag": 7})
            pipe(PROMPTS[0], height=32, width=48, **options)
    finally:
        attn.processor = original
    assert seen == [("star", None), ("named", 7)]
