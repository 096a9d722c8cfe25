"""Token optimization: recovers known embeddings, saves safely, refuses bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import generate

from opendaam.heatmaps import encode_text, heatmaps
from opendaam.models import build_pipeline
from opendaam.optimize import OptimizeConfig, OptimizedToken, load_token, nearest_words, optimize_token
from opendaam.tracing import trace


@pytest.fixture(scope="module")
def records(tiny_pipe):
    with trace(tiny_pipe, prompt=["a red car", "a blue bus"], queries=True) as tracer:
        generate(tiny_pipe, prompt=["a red car", "a blue bus"], num_inference_steps=3, height=32, width=32)
    return tracer.records


INIT_SEED = 0


def _iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


@pytest.mark.parametrize(("size", "floor"), [("image", 0.95), ("latent", 0.9)])
def test_linear_recovers_a_known_embedding(records, size, floor):
    # the target masks are thresholded at image size: a loss at image size can reproduce them exactly; at
    # latent size the area-averaged targets blur the boundary (measured 0.94-0.98 over init seeds)
    dim = records[0].linear_map.shape[1]
    x_star = torch.randn(dim, generator=torch.Generator().manual_seed(7))
    targets = [heatmaps(r, x_star, "linear").normalized()[0] >= 0.5 for r in records]
    init = torch.randn(dim, generator=torch.Generator().manual_seed(INIT_SEED))  # not the global RNG: no flakiness
    token = optimize_token(records, [t.numpy() for t in targets], init=init, progress=False, size=size,
                           loss="margin", lr=0.3, epochs=1500, patience=300)
    for r, t in zip(records, targets, strict=True):
        got = heatmaps(r, token, "linear").normalized()[0] >= 0.5
        assert _iou(got, t) > floor
    assert token.history[0]["loss"] > token.meta["loss"]


@pytest.mark.parametrize("loss", ["ce", "bce", "soft_iou", "margin"])
def test_other_losses_improve(records, loss):
    dim = records[0].linear_map.shape[1]
    x_star = torch.randn(dim, generator=torch.Generator().manual_seed(3))
    targets = [(heatmaps(r, x_star, "linear").normalized()[0] >= 0.5).numpy() for r in records]
    token = optimize_token(records, targets, init="car", loss=loss, progress=False, epochs=150, lr=0.05)
    start = heatmaps(records[0], records[0].context[3], "linear").normalized()[0] >= 0.5
    got = heatmaps(records[0], token, "linear").normalized()[0] >= 0.5
    assert _iou(got, torch.as_tensor(targets[0])) > _iou(start, torch.as_tensor(targets[0]))


def test_open_vocab_optimization(records, tiny_pipe):
    dim = records[0].linear_map.shape[1]
    pair = torch.randn(2, dim, generator=torch.Generator().manual_seed(5))
    targets = [(heatmaps(r, pair, "open_vocab", pipe=tiny_pipe).normalized()[0] >= 0.5).numpy() for r in records]
    calls = []
    token = optimize_token(records, targets, method="open_vocab", pipe=tiny_pipe, init="car", loss="bce",
                           progress=False, epochs=120, lr=0.1, callback=calls.append)
    assert token.embedding.shape == (2, dim)
    assert len(calls) == token.meta["epochs_run"] and calls[0]["epoch"] == 0
    # the checkpoint is the epoch of the best max-over-thresholds train IoU (the loss' sharpness changes)
    best = token.meta["best_epoch"]
    assert token.meta["train_max_miou"] == max(c["train_max_miou"] for c in calls) == calls[best]["train_max_miou"]
    assert token.meta["loss"] == calls[best]["loss"]
    got = heatmaps(records[1], token, "open_vocab", pipe=tiny_pipe).normalized()[0] >= 0.5
    assert _iou(got, torch.as_tensor(targets[1])) > 0.8


_PATH_FLAGS = {"avx512": ("avx512bw", "avx512vl", "avx512_vnni"), "avx2": ("avx2", "fma", "f16c")}


def _cpu() -> tuple[str, set[str]]:
    """This CPU's model name and feature flags ('' and none where /proc/cpuinfo is missing)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "", set()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")),
                 set())
    return model, flags


def _random_layer(shape, seed, v_scale):
    """A random int8 query cache (codes, fp16 scales) and key difference v for ``shape`` = (heads, steps,
    pixels, d), with the generator to draw more from."""
    heads, steps, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (heads, steps * n, d), generator=gen, dtype=torch.int8)  # (H, R, d)
    scales = (torch.rand(heads, steps * n, generator=gen) * 0.03).half()  # (H, R)
    v = torch.randn(heads, d, generator=gen) * v_scale  # (H, d)
    return gen, codes, scales, v


def _native_expected(path: str | None = None) -> bool:
    """This machine can build the native kernels' ``path`` (None: either): x86-64 with its flags and a C
    compiler."""
    import platform
    import shutil

    _, flags = _cpu()
    paths = [path] if path else list(_PATH_FLAGS)
    return (platform.machine() == "x86_64" and (shutil.which("cc") or shutil.which("gcc")) is not None
            and any(all(f in flags for f in _PATH_FLAGS[p]) for p in paths))


def _no_native_reason(path: str | None = None) -> str:
    """Why the native kernel (``path``, None: any) cannot run here, naming the CPU and the flags it lacks."""
    import platform
    import shutil

    model, flags = _cpu()
    if not model:
        return f"no /proc/cpuinfo on {platform.machine()}: the native kernels need x86-64 AVX2 or AVX-512 VNNI"
    wanted = _PATH_FLAGS[path] if path else _PATH_FLAGS["avx2"]
    missing = [f for f in wanted if f not in flags]
    has = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_int8")
           if f in flags]
    compiler = "" if (shutil.which("cc") or shutil.which("gcc")) else "; no C compiler"
    return (f"native kernel ({path or 'any path'}) not run: CPU {model!r} ({platform.machine()}) has "
            f"{', '.join(has) or 'none'} of the relevant flags, lacks {', '.join(missing) or 'none'}{compiler}")


@pytest.mark.parametrize("kernel", ["native", "torch int8 matmul"])
@pytest.mark.parametrize("source", ["quantized here", "int8 record"])
def test_open_vocab_int8_kernels_match_float_objective(records, tiny_pipe, source, kernel):
    """The int8 paths (fused native kernel, or codes through torch's int8-weight matmuls) give the maps and
    gradient of the float path on the same codes: dequantized int8 queries through the float code."""
    from opendaam import _kernels
    from opendaam.optimize import (
        _FloatBackend,
        _int8_kernel_ok,
        _NativeBackend,
        _OpenVocabObjective,
        _TorchInt8Backend,
    )

    native = kernel == "native"
    if native:
        if not _native_expected():
            pytest.skip(_no_native_reason())
        assert _kernels.available()  # where it can build, the suite must exercise the native path
        print(f"native kernel path: {_kernels.isa()}, AMX tiles: {_kernels.amx()}")
    else:
        assert _int8_kernel_ok()  # torch 2.13 CPU has the op; the suite must exercise the int8 path
    if source == "int8 record":
        with trace(tiny_pipe, prompt="a red car", queries=True, query_dtype="int8") as tracer:
            generate(tiny_pipe, prompt="a red car", num_inference_steps=3, height=32, width=32)
        recs = tracer.records
        fast = _OpenVocabObjective(recs, tiny_pipe, "auto", native=native)
    else:
        recs = records
        fast = _OpenVocabObjective(recs, tiny_pipe, "int8", native=native)
    assert fast.backend is (_NativeBackend if native else _TorchInt8Backend)
    slow = _OpenVocabObjective(recs, tiny_pipe, "bfloat16")
    assert slow.backend is _FloatBackend
    for float_backend, int8_backend in zip(slow.backends, fast.backends, strict=True):  # floats from the codes
        for name, layer in int8_backend.layers.items():
            d = recs[0].layers[name].head_dim
            if native:  # back from the kernel's blocks: (heads, blocks, steps, 16, d16) -> (heads, steps * n, d)
                packed = layer.packed
                heads, blocks, steps, _, d16 = packed.codes.shape
                n = packed.n
                raw = packed.codes.transpose(1, 2).reshape(heads, steps, blocks * 16, d16)[:, :, :n, :d]
                scales = packed.scales.transpose(1, 2).reshape(heads, steps, blocks * 16)[:, :, :n]
                raw, scales = raw.reshape(heads, steps * n, d), scales.reshape(heads, steps * n).float()
            else:
                raw, scales = layer.codes[..., :d], layer.scales_f.float()
            codes = raw.float() * scales.unsqueeze(-1)  # (heads, R, d)
            float_backend.layers[name] = codes.to(torch.bfloat16)
    dim = recs[0].linear_map.shape[1]
    x1 = torch.randn(2, dim, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    weights = torch.rand(fast(x1).shape, generator=torch.Generator().manual_seed(4))
    a, b = fast(x1), slow(x2)
    assert a.shape == b.shape == (len(recs), 2, 16 * 16)
    assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * float(b.detach().abs().max()))
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    assert F.cosine_similarity(x1.grad.flatten(), x2.grad.flatten(), dim=0) > 0.999
    assert 0.98 < float(x1.grad.norm() / x2.grad.norm()) < 1.02  # the size too, not only the direction
    if native:  # the Jacobians are released after one backward
        a = fast(x1)
        (a * weights).sum().backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="released after one backward"):
            (a * weights).sum().backward()


def test_float_backend_is_the_bfloat16_product_bit_for_bit(records, tiny_pipe):
    """The float backend computes, per layer, exactly the bfloat16 product the objective used before the
    backends existed (written out here: one (R, d) @ (d, 1) product per head, sigmoid, sum over heads and
    steps), maps and gradients equal bit for bit; and the objective picks its backend once, by name."""
    from opendaam.cache import queries
    from opendaam.optimize import _FloatBackend, _OpenVocabObjective, _TorchInt8Backend

    objective = _OpenVocabObjective(records, tiny_pipe, "bfloat16")
    assert objective.backend is _FloatBackend and all(type(b) is _FloatBackend for b in objective.backends)
    assert _OpenVocabObjective(records, tiny_pipe, "auto").backend is _FloatBackend  # float caches stay float
    assert _OpenVocabObjective(records, tiny_pipe, "int8", native=False).backend is _TorchInt8Backend
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, records[0].linear_map.shape[1], generator=gen)
    for r, backend in zip(records, objective.backends, strict=True):
        for name, info in r.layers.items():
            v1 = torch.randn(info.heads, info.head_dim, generator=gen, requires_grad=True)
            v2 = v1.detach().clone().requires_grad_(True)
            got, steps = backend.maps({n: v1 if n == name else torch.zeros(i.heads, i.head_dim)
                                       for n, i in r.layers.items()})[name]
            q = queries(r, name).transpose(0, 1).reshape(info.heads, -1, info.head_dim).to(torch.bfloat16)
            vb = v2.to(torch.bfloat16)
            score = torch.stack([(q[h] @ vb[h, :, None])[:, 0] for h in range(info.heads)]).float()
            want = torch.sigmoid(score).view(info.heads, -1, info.pixels).sum((0, 1))
            assert steps == len(r.steps) and torch.equal(got, want)
            w = torch.rand(want.shape, generator=gen)
            (got * w).sum().backward()
            (want * w).sum().backward()
            assert torch.equal(v1.grad, v2.grad)
    assert tuple(objective(x).shape) == (len(records), 2, 16 * 16)


@pytest.mark.parametrize("queries", ["bfloat16", "int8"])
def test_open_vocab_objective_equals_heatmaps(records, tiny_pipe, queries):
    """The objective's object and background maps are heatmaps' open-vocabulary maps of the two rows (softmax
    over them), computed another way: per layer, upsampled one by one, from the fp16 cache."""
    from opendaam.optimize import _OpenVocabObjective

    dim = records[0].linear_map.shape[1]
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(5))
    got = _OpenVocabObjective(records, tiny_pipe, queries)(x)  # (N, 2, P)
    for i, rec in enumerate(records):
        want = heatmaps(rec, [x[0:1], x[1:2]], "open_vocab", pipe=tiny_pipe).latent.flatten(1)  # (2, P)
        assert got[i].shape == want.shape
        assert torch.allclose(got[i], want, rtol=0, atol=2e-2 * float(want.abs().max()))
        assert (got[i] - want).abs().mean() < 3e-3 * float(want.abs().max())


_SHAPES = [(2, 3, 16, 16), (3, 2, 5, 40), (4, 31, 64, 64), (1, 2, 300, 80), (2, 1, 7, 128), (1, 67, 40, 32)]


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", _SHAPES)
def test_native_kernels_match_float64_reference(shape, threads, isa):
    """The fused kernel's map and Jacobian against einsums in float64, and the gradient ``g @ jac`` against
    the gradient summed row by row, on each path (AVX-512 VNNI, portable AVX2; AMX tiles equal VNNI bit for
    bit, tested below): head sizes with an odd number of 16-element chunks, pixel counts that are not
    multiples of 16, an odd number of steps, and more steps than the kernel keeps weights for at once."""
    from opendaam import _kernels

    if not _native_expected(isa):
        pytest.skip(_no_native_reason(isa))
    assert _kernels.available(isa)  # where it can build, the suite must exercise this path
    heads, steps, n, d = shape
    gen, codes, scales, v = _random_layer(shape, sum(shape), 1.0)
    g = torch.randn(n, generator=gen)
    s = torch.einsum("hrd,hd->hr", codes.double(), v.double()) * scales.double()  # (H, R)
    p = torch.sigmoid(s)
    want_map = p.view(heads, steps, n).sum((0, 1))
    slope = (p * (1 - p) * scales.double()).view(heads, steps, n)  # d prob / d (codes . v)
    want_jac = torch.einsum("hsn,hsnd->nhd", slope, codes.double().view(heads, steps, n, d))
    want_grad = torch.einsum("hr,hrd->hd", (slope * g.double()).flatten(1), codes.double())
    packed = _kernels.pack(codes, scales, steps, n)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got_map, jac = _kernels.int8_map(packed, v, amx=False, isa=isa)
        buffer = torch.full(jac.shape, float("nan"), dtype=torch.float16)
        again, jac2 = _kernels.int8_map(packed, v, jac=buffer, amx=False, isa=isa)
        (got_grad,) = _kernels.jac_grads([packed], [jac], [g], isa=isa)
    finally:
        torch.set_num_threads(old)
    d16 = -(-d // 16) * 16
    assert got_map.shape == (n,) and jac.shape == (n, heads, d16) and jac.dtype == torch.float16
    assert jac2 is buffer and torch.equal(jac2, jac) and torch.equal(again, got_map)  # every entry written
    assert torch.allclose(got_map.double(), want_map, rtol=1e-4, atol=1e-3)
    # int16 weights per block of 16 pixels (~1e-4 of the block's largest), float16 storage (~2.4e-4 relative)
    got_jac = jac[..., :d].double() * packed.jac_unit
    assert torch.allclose(got_jac, want_jac, atol=1e-3 * float(want_jac.abs().max()))
    assert not jac[..., d:].any()  # padded columns
    assert got_grad.shape == (heads, d16) and not got_grad[:, d:].any()
    assert torch.allclose(got_grad[:, :d].double(), want_grad, atol=1e-3 * float(want_grad.abs().max()))
    with pytest.raises(ValueError, match="over the kernels' 128"):
        _kernels.pack(torch.zeros(1, n, 144, dtype=torch.int8), scales[:1, :n], 1, n)
    with pytest.raises(ValueError, match="rows are not"):
        _kernels.pack(codes, scales, steps + 1, n)
    with pytest.raises(ValueError, match="v must be"):
        _kernels.int8_map(packed, v[:, :-1])
    with pytest.raises(ValueError, match="jac must be"):
        _kernels.int8_map(packed, v, jac=torch.empty(n, heads, d16 + 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="g must be"):
        _kernels.jac_grads([packed], [jac], [g[:-1]])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", _SHAPES)
def test_native_avx2_and_avx512_paths_are_bit_identical(shape, threads):
    """The portable AVX2 path computes the AVX-512 path's integers and floats in the same order: maps,
    Jacobians and gradients equal bit for bit (any lane order, pairing or rounding slip would show)."""
    from opendaam import _kernels

    for isa in _kernels.ISAS:
        if not _native_expected(isa):
            pytest.skip(_no_native_reason(isa))
    heads, steps, n, d = shape
    gen, codes, scales, v = _random_layer(shape, 11 + sum(shape), 3)
    g = torch.randn(n, generator=gen)
    packed = _kernels.pack(codes, scales, steps, n)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = {}
        for isa in _kernels.ISAS:
            m, jac = _kernels.int8_map(packed, v, amx=False, isa=isa)
            got[isa] = m, jac, _kernels.jac_grads([packed], [jac], [g], isa=isa)[0]
    finally:
        torch.set_num_threads(old)
    assert got["avx2"][0].abs().sum() > 0 and got["avx2"][1].abs().sum() > 0  # not two empty results
    for a, b in zip(got["avx512"], got["avx2"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (3, 2, 5, 40), (4, 31, 64, 64), (1, 2, 30, 80),
                                   (2, 1, 7, 128), (1, 67, 40, 32)])
def test_native_amx_and_vnni_paths_give_the_same_integers(shape):
    """Where AMX is granted the tile path runs, and its maps and Jacobians equal the AVX-512 VNNI path's bit
    for bit (both quantize v to the same int16, so any tile configuration or lane error would show)."""
    from opendaam import _kernels

    if not _native_expected("avx512"):
        pytest.skip(_no_native_reason("avx512"))
    if "amx_int8" not in open("/proc/cpuinfo").read():
        pytest.skip("no AMX on this CPU")
    assert _kernels.amx()  # where the CPU has it, the suite must exercise the tile path
    heads, steps, n, d = shape
    _, codes, scales, v = _random_layer(shape, 7 + sum(shape), 3)
    packed = _kernels.pack(codes, scales, steps, n)
    tiles, vnni = _kernels.int8_map(packed, v, amx=True), _kernels.int8_map(packed, v, amx=False)
    assert torch.equal(tiles[0], vnni[0]) and torch.equal(tiles[1], vnni[1])


def test_native_kernel_refuses_a_bad_packed_layer():
    """A hand-built ``Packed`` whose shapes do not match its pixel count is refused before the kernel runs."""
    from opendaam import _kernels

    if not _native_expected():
        pytest.skip(_no_native_reason())
    good = _kernels.pack(torch.ones(1, 2 * 40, 16, dtype=torch.int8), torch.ones(1, 80), steps=2, n=40)
    bad = _kernels.Packed(codes=good.codes, scales=good.scales, n=60, head_dim=16, jac_unit=good.jac_unit)
    with pytest.raises(ValueError, match="not a packed layer of 60 pixels"):
        _kernels.int8_maps([bad], [torch.zeros(1, 16)])
    strided = _kernels.Packed(codes=good.codes.transpose(1, 2), scales=good.scales, n=40, head_dim=16,
                              jac_unit=good.jac_unit)
    with pytest.raises(ValueError, match="build it with pack"):
        _kernels.int8_maps([strided], [torch.zeros(1, 16)])


def test_queries_option_validated():
    with pytest.raises(ValueError, match="queries must be 'auto', 'bfloat16' or 'int8'"):
        OptimizeConfig(queries="fp8")


def test_token_save_load_and_compatibility(records, tiny_pipe, tmp_path):
    token = optimize_token(records[:1], [np.ones((32, 32)) * (np.arange(32) < 12)[:, None]], init="car",
                           progress=False, epochs=5, label="car")
    path = token.save(tmp_path / "car.safetensors")
    loaded = load_token(path, pipe=tiny_pipe, record=records[1])
    assert torch.equal(loaded.embedding, token.embedding)
    assert loaded.meta["text_dim"] == 32 and loaded.meta["init"] == "car" and loaded.label == "car"
    assert torch.equal(heatmaps(records[1], loaded, "linear").soft, heatmaps(records[1], token, "linear").soft)
    other = OptimizedToken(torch.zeros(1, 1024), "car", {"text_dim": 1024, "model": "stabilityai/sd2"})
    with pytest.raises(ValueError, match="text width 1024 \\(token\\) vs 32 \\(pipeline\\)"):
        load_token(other.save(tmp_path / "other.safetensors"), pipe=tiny_pipe)


def test_bad_input(records, tiny_pipe):
    with pytest.raises(ValueError, match=r"mask 0 is \(20, 20\) but record 0 is \(32, 32\)"):
        optimize_token(records[:1], [np.ones((20, 20))], progress=False)
    with pytest.raises(ValueError, match="mask 1 is empty"):
        optimize_token(records, [np.ones((32, 32)), np.zeros((32, 32))], progress=False)
    with pytest.raises(ValueError, match="2 records but 1 masks"):
        optimize_token(records, [np.ones((32, 32))], progress=False)
    other_pipe = build_pipeline("tiny", seed=1)
    other_pipe.set_progress_bar_config(disable=True)
    other_pipe.register_to_config(_name_or_path="other-model")
    with trace(other_pipe, prompt="a car") as tracer:
        generate(other_pipe, prompt="a car")
    with pytest.raises(ValueError, match="records 0 and 1 come from different models"):
        optimize_token([records[0], tracer.records[0]], [np.ones((32, 32))] * 2, progress=False)
    with pytest.raises(ValueError, match="method must be 'linear' or 'open_vocab'"):
        optimize_token(records, [np.ones((32, 32))] * 2, method="daam", progress=False)


def test_nearest_words_finds_the_word_itself(tiny_pipe):
    states, tokens = encode_text(tiny_pipe, "car")
    # '<start> car' as the encoder sees it: the causal encoder ignores what follows
    found = nearest_words(states[1], tiny_pipe, k=3, vocabulary=["tree", "car", "building", "sky"])
    assert found[0][0] == "car" and found[0][1] == pytest.approx(1.0, abs=1e-4)
    assert len(found) == 3


def test_adam_matches_torch_adam():
    """The optimizer of optimize_token takes the same steps as torch.optim.Adam with the same settings."""
    from opendaam.optimize import _Adam

    gen = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(2, 64, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    ours, theirs = _Adam(a, lr=0.05), torch.optim.Adam([b], lr=0.05, foreach=False)
    for _ in range(25):
        g = torch.randn(2, 64, generator=gen)
        ours.zero_grad()
        theirs.zero_grad()
        (a * g).sum().backward()
        (b * g).sum().backward()
        ours.step()
        theirs.step()
    assert a.grad is not None and torch.allclose(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(a, torch.zeros_like(a))


def test_bad_targets_and_options_are_refused_before_optimizing():
    """NaN, negative and label-style masks, a NaN start, epochs=0 and lr=nan: one clear error each (these used
    to be accepted and gave an inf loss or a target scaled to 3/255)."""
    from opendaam.tracing import Record

    m = torch.zeros(4, 2)
    r = Record(meta={"latent_size": [2, 2], "image_size": [2, 2], "text_dim": 2}, linear_map=m)
    good = np.array([[1, 0], [0, 0]])
    cases = [
        (dict(masks=[np.array([[np.nan, 1.0], [0, 0]])]), "NaN or infinite"),
        (dict(masks=[np.array([[-1.0, 1.0], [0, 0]])]), "negative values"),
        (dict(masks=[np.array([[0, 3], [3, 0]])]), r"values \[0.0, 3.0\]: masks are 0/1"),
        (dict(init=torch.tensor([float("nan"), 0.0])), "init tensor has NaN"),
        (dict(epochs=0), "epochs must be a whole number >= 1"),
        (dict(lr=float("nan")), "lr must be a finite number > 0"),
    ]
    for change, message in cases:
        kwargs = dict(masks=[good], init=torch.zeros(2), progress=False)
        kwargs.update(change)
        masks = kwargs.pop("masks")
        with pytest.raises(ValueError, match=message):
            optimize_token([r], masks, **kwargs)
    assert optimize_token([r], [np.array([[255, 0], [0, 0]], np.uint8)], init=torch.zeros(2), progress=False,
                          epochs=2).embedding.shape == (1, 2)
