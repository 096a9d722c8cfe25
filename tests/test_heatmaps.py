"""Heatmaps: each method checked against a computation done another way."""

import pytest
import torch
import torch.nn.functional as F
from conftest import generate

import opendaam
from opendaam import tracing
from opendaam.cache import load_record
from opendaam.heatmaps import heatmaps
from opendaam.models import cross_attention_layers
from opendaam.tracing import trace

PROMPT = "a red car and a traffic light"


@pytest.fixture(scope="module")
def traced(tiny_pipe):
    with trace(tiny_pipe, prompt=PROMPT, queries=True, query_dtype="float32", daam_per_step=True,
               linear_layers=True) as tracer:
        generate(tiny_pipe, prompt=PROMPT, num_inference_steps=3, height=32, width=48)
    return tracer.records[0]


def _reference_daam(pipe, prompt, **kwargs):
    """DAAM written plainly: torch forward hooks on every attn2, diffusers' eager attention scores."""
    captured = []

    def hook(module, args, kwargs_, output):
        hidden = args[0] if args else kwargs_["hidden_states"]
        context = kwargs_.get("encoder_hidden_states")
        captured.append((module, hidden.detach().clone(), context.detach().clone()))

    modules = cross_attention_layers(pipe.unet)
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules.values()]
    try:
        generate(pipe, prompt=prompt, **kwargs)
    finally:
        for h in handles:
            h.remove()
    height, width = kwargs["height"] // pipe.vae_scale_factor, kwargs["width"] // pipe.vae_scale_factor
    total = torch.zeros(77, height, width)
    for module, hidden, context in captured:
        cond_h, cond_c = hidden.chunk(2)[1], context.chunk(2)[1]  # second half: conditional
        q = module.head_to_batch_dim(module.to_q(cond_h))
        k = module.head_to_batch_dim(module.to_k(cond_c))
        probs = module.get_attention_scores(q, k)  # (heads, N, 77)
        n = probs.shape[1]
        f = 1
        while (height // f) * (width // f) != n:
            f *= 2
        grid = probs.sum(0).T.reshape(1, 77, height // f, width // f)
        total += F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)[0]
    return total


def test_daam_matches_plain_implementation(tiny_pipe):
    kwargs = dict(num_inference_steps=3, height=32, width=48)
    reference = _reference_daam(tiny_pipe, PROMPT, **kwargs)
    with trace(tiny_pipe, prompt=PROMPT) as tracer:
        generate(tiny_pipe, prompt=PROMPT, **kwargs)
    record = tracer.records[0]
    maps = heatmaps(record, [2, "car", "traffic light"])
    assert torch.allclose(maps.latent[0], reference[2], atol=1e-4, rtol=1e-4)
    assert torch.allclose(maps.latent[1], reference[3], atol=1e-4, rtol=1e-4)
    assert torch.allclose(maps.latent[2], (reference[6] + reference[7]) / 2, atol=1e-4, rtol=1e-4)
    assert maps.soft.shape == (3, 32, 48)
    assert maps.token_indices == [[2], [3], [6, 7]]


@pytest.mark.parametrize("query_scale", [1.0, 60.0])
def test_daam_softmax_with_and_without_max_shift(tiny_pipe, monkeypatch, query_scale):
    """Scores within the exp2-safe bound skip the max subtraction; large scores (queries scaled up) take it;
    both match the plain implementation."""
    from opendaam.tracing import recorders

    seen = []
    bounded = recorders.scores_bounded
    monkeypatch.setattr(recorders, "scores_bounded", lambda q, k: seen.append(bounded(q, k)) or seen[-1])
    layers = cross_attention_layers(tiny_pipe.unet).values()
    saved = [m.to_q.weight.detach().clone() for m in layers]
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    try:
        with torch.no_grad():
            for m in layers:
                m.to_q.weight.mul_(query_scale)
        reference = _reference_daam(tiny_pipe, PROMPT, **kwargs)
        with trace(tiny_pipe, prompt=PROMPT) as tracer:
            generate(tiny_pipe, prompt=PROMPT, **kwargs)
    finally:
        with torch.no_grad():
            for m, w in zip(layers, saved, strict=True):
                m.to_q.weight.copy_(w)
    assert seen and all(seen) == (query_scale == 1.0) and any(seen) == (query_scale == 1.0)
    got = heatmaps(tracer.records[0], list(range(77))).latent
    assert torch.isfinite(got).all()
    assert torch.allclose(got, reference, atol=1e-4 * float(reference.detach().abs().max()), rtol=1e-4)


@pytest.mark.parametrize("in_place", [False, True])
def test_daam_follows_text_states_changed_between_steps(tiny_pipe, in_place):
    """Keys are cached per generation only while the pipeline passes the same unmodified text states."""
    other = tiny_pipe.encode_prompt("a green tree", "cpu", 1, True)  # (conditional, unconditional)

    def swap(pipe, step, timestep, kwargs):
        embeds = kwargs["prompt_embeds"]  # (2, 77, dim): unconditional, conditional
        if in_place:
            embeds[1:].mul_(0.5)
            return {}
        return {"prompt_embeds": torch.cat([other[1], other[0]])}

    kwargs = dict(num_inference_steps=3, height=32, width=32, callback_on_step_end=swap,
                  callback_on_step_end_tensor_inputs=["prompt_embeds"])
    reference = _reference_daam(tiny_pipe, PROMPT, **kwargs)
    with trace(tiny_pipe, prompt=PROMPT) as tracer:
        generate(tiny_pipe, prompt=PROMPT, **kwargs)
    maps = heatmaps(tracer.records[0], [1, 2, 3])
    assert torch.allclose(maps.latent, reference[1:4], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps_per_batch, softmax_floats", [(1, None), (2, None), (None, 1)])
def test_batched_steps_record_the_same(tiny_pipe, monkeypatch, steps_per_batch, softmax_floats):
    """Layers computed a few steps at a time (buffer full, flushed, the rest at the end), one step at a
    time, or with the softmax run one step at a time inside a batch give the record of the default, where
    each of these small layers holds all its steps."""
    kwargs = dict(num_inference_steps=5, height=32, width=48)
    options = dict(queries=True, query_dtype="float32", daam_per_step=True, linear_layers=True)
    with trace(tiny_pipe, prompt=PROMPT, **options) as tracer:
        generate(tiny_pipe, prompt=PROMPT, **kwargs)
    whole = tracer.records[0]
    modules = cross_attention_layers(tiny_pipe.unet)
    step_bytes = max(info.pixels * modules[n].to_q.in_features * 4 for n, info in whole.layers.items())
    if steps_per_batch is not None:
        monkeypatch.setattr(tracing.tracer, "_BUFFER_BYTES", steps_per_batch * step_bytes)
    if softmax_floats is not None:
        monkeypatch.setattr(tracing.recorders, "_SOFTMAX_FLOATS", softmax_floats)
    with trace(tiny_pipe, prompt=PROMPT, **options) as tracer:
        generate(tiny_pipe, prompt=PROMPT, **kwargs)
    parts = tracer.records[0]
    assert len(whole.steps) == 5 and whole.layers == parts.layers  # 2 + 2 + 1 steps per batch
    for field in ("daam", "daam_steps", "queries", "query_sums"):
        a, b = getattr(whole, field), getattr(parts, field)
        assert a.keys() == b.keys() == whole.layers.keys()
        for name in a:
            assert a[name].shape == b[name].shape
            assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5, rtol=1e-4), (field, name)
    assert torch.allclose(whole.linear_map, parts.linear_map, atol=1e-5, rtol=1e-4)


def test_open_vocab_with_generating_prompt_equals_daam(traced, tiny_pipe):
    words = ["red", "car", "traffic light", "<sot>", "<eot>"]
    daam = heatmaps(traced, words)
    states = traced.context  # X' = X given as raw embeddings (all 77 positions)
    explicit = heatmaps(traced, states, method="open_vocab", pipe=tiny_pipe)
    assert torch.allclose(explicit.latent[3], daam.latent[1], atol=1e-5)
    # words: the record's own context is X'
    ov = heatmaps(traced, words, method="open_vocab", pipe=tiny_pipe)
    assert torch.allclose(ov.latent, daam.latent, atol=1e-5)
    # re-encoding the prompt text gives the same keys
    ov_text = heatmaps(traced, words, method="open_vocab", pipe=tiny_pipe, context=PROMPT)
    assert torch.allclose(ov_text.latent, daam.latent, atol=1e-4)
    # the same for chosen layers, steps and heads (per-step DAAM is stored in fp16)
    sel = dict(layers="up_blocks.1", steps=[0, 2], heads=[1])
    assert torch.allclose(heatmaps(traced, words, "open_vocab", pipe=tiny_pipe, **sel).latent,
                          heatmaps(traced, words, **sel).latent, atol=2e-3)


def test_open_vocab_softmax_domain(traced, tiny_pipe):
    padded = heatmaps(traced, ["car"], "open_vocab", pipe=tiny_pipe, context="a car and a tree")
    prompt = heatmaps(traced, ["car"], "open_vocab", pipe=tiny_pipe, context="a car and a tree",
                      softmax_over="prompt")
    assert not torch.allclose(padded.latent, prompt.latent)
    assert (prompt.latent >= padded.latent - 1e-6).all()  # fewer competitors, more mass per token


def test_linear_equals_explicit_sum(traced, tiny_pipe):
    x = torch.randn(2, tiny_pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    fast = heatmaps(traced, x, method="linear")
    modules = cross_attention_layers(tiny_pipe.unet)
    h, w = traced.latent_size
    explicit = torch.zeros(2, h, w)
    for name, info in traced.layers.items():
        k = modules[name].to_k(x).detach()  # (2, inner)
        for t in range(traced.queries[name].shape[0]):
            q = traced.queries[name][t].float().transpose(0, 1).reshape(info.height * info.width, -1)  # (N, inner)
            for head in range(info.heads):
                sl = slice(head * info.head_dim, (head + 1) * info.head_dim)
                m = (q[:, sl] @ k[:, sl].T).T.reshape(2, 1, info.height, info.width)
                explicit += F.interpolate(m, size=(h, w), mode="bicubic", align_corners=False)[:, 0]
    assert torch.allclose(fast.latent, explicit, atol=1e-3, rtol=1e-4)
    # the slow path through chosen layers (all of them, per head) gives the same
    per_head = sum(heatmaps(traced, x, "linear", pipe=tiny_pipe, heads=[i]).latent for i in range(2))
    assert torch.allclose(per_head, explicit, atol=1e-3, rtol=1e-4)


def test_linear_is_differentiable(traced):
    x = torch.randn(tracedim(traced), requires_grad=True)
    maps = heatmaps(traced, x, method="linear")
    target = torch.zeros_like(maps.latent)
    loss = ((maps.normalized(size="latent") - target) ** 2).mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def tracedim(record):
    return record.linear_map.shape[1]


def test_open_vocab_is_differentiable(traced, tiny_pipe):
    x = torch.randn(3, tracedim(traced), requires_grad=True)
    maps = heatmaps(traced, x, method="open_vocab", pipe=tiny_pipe)
    maps.latent[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_layer_step_head_selection_sums_to_total(traced):
    total = heatmaps(traced, ["car"]).latent
    by_layer = sum(heatmaps(traced, ["car"], layers=name).latent for name in traced.layers)
    assert torch.allclose(by_layer, total, atol=1e-5)
    by_step = sum(heatmaps(traced, ["car"], steps=s).latent for s in traced.steps)
    assert torch.allclose(by_step, total, atol=1e-3)
    by_head = sum(heatmaps(traced, ["car"], heads=hd).latent for hd in range(2))
    assert torch.allclose(by_head, total, atol=1e-5)


def test_persistence_roundtrip(traced, tiny_pipe, tmp_path):
    path = traced.save(tmp_path / "rec.safetensors")
    loaded = load_record(path)
    assert loaded.meta == traced.meta
    for method, kwargs in [("daam", {}), ("linear", {}), ("open_vocab", {"pipe": tiny_pipe})]:
        a = heatmaps(traced, ["car", "red"], method, **kwargs).soft
        b = heatmaps(loaded, ["car", "red"], method, **kwargs).soft
        assert torch.equal(a, b), method
    assert not list(tmp_path.glob("*.tmp"))


def test_int8_queries_correlate(tiny_pipe):
    maps = {}
    for dtype in ("float16", "int8"):
        with trace(tiny_pipe, prompt=PROMPT, queries=True, query_dtype=dtype) as tracer:
            generate(tiny_pipe, prompt=PROMPT)
        record = tracer.records[0]
        maps[dtype] = heatmaps(record, ["car", "tree"], "open_vocab", pipe=tiny_pipe).latent.flatten()
        if dtype == "int8":
            assert all(q.dtype == torch.int8 for q in record.queries.values())
            info = next(iter(record.layers.values()))
            assert record.queries[info.name].shape[1:] == (info.heads, info.pixels, info.head_dim)
    corr = torch.corrcoef(torch.stack([maps["float16"], maps["int8"]]))[0, 1]
    assert corr >= 0.999


def test_masks_threshold_relative_to_max(traced):
    maps = heatmaps(traced, ["car"])
    soft = maps.soft[0]
    assert torch.equal(maps.masks(0.5)[0], soft >= 0.5 * soft.max())


def test_errors(traced, tiny_pipe):
    with pytest.raises(KeyError, match="its words are: a, red, car, and, a, traffic, light"):
        heatmaps(traced, ["tree"])
    with pytest.raises(ValueError, match="choose one of: daam, open_vocab, linear"):
        heatmaps(traced, ["car"], method="gradcam")
    with pytest.raises(ValueError, match="the record has these layers: down_blocks.0"):
        heatmaps(traced, ["car"], layers="down_blocks.7")
    with pytest.raises(ValueError, match="pass pipe="):
        heatmaps(traced, ["tree"], method="linear")
    with pytest.raises(ValueError, match="at most 77"):
        heatmaps(traced, ["car"], method="open_vocab", pipe=tiny_pipe, context="car " * 90)
    with pytest.raises(ValueError, match=r"steps \[9\] were not recorded"):
        heatmaps(traced, ["car"], steps=[9])
    with pytest.raises(ValueError, match="heads \\[5\\] do not exist"):
        heatmaps(traced, ["car"], heads=[5])


def test_public_names():
    assert callable(opendaam.trace) and callable(opendaam.heatmaps) and callable(opendaam.load_record)
