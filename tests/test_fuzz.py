"""Property-based tests of the parsers: random specs, spec files, record and token files never end in an
unexpected exception, and a spec that validates never names a path outside the dataset folder."""

import string
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from opendaam.cli._checks import check_record_file, check_token_file  # noqa: E402
from opendaam.dataset.io import DatasetError, inside  # noqa: E402
from opendaam.dataset.spec import SpecError, item_count, load_spec, parse_spec  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "opendaam" / "examples" / "urban_multiclass.yaml"
KEYS = ["classes", "name", "model", "scheduler", "steps", "guidance", "height", "width", "prompts", "seeds",
        "method", "normalize", "thresholds", "filter", "outputs", "start", "count", "split", "city", "formats",
        "prompts", "text", "words", "token", "low", "high", "bogus"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True), st.text(alphabet=string.printable + "{}/\\.", max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=12)
classes = st.lists(st.fixed_dictionaries({"name": st.text(alphabet=string.printable, min_size=1, max_size=8)},
                                         optional={"prompts": st.lists(st.sampled_from(["a {}", "two {}", "{} x",
                                                                                        "{{}}", "a {car}"]),
                                                                       max_size=2)}), min_size=1, max_size=3)


def checked(spec) -> None:
    """A valid spec's file names stay inside a dataset folder, and its item count is bounded."""
    assert 0 < item_count(spec) <= 1_000_000
    inside("/data/set", f"coco/instances_{spec.outputs.split}.json")
    inside("/data/set/cityscapes", f"gtFine/{spec.outputs.split}/{spec.outputs.city or 'x'}/f.png")


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6), classes)
def test_random_specs_validate_or_raise_spec_error(data, cls):
    for candidate in (data, {**data, "classes": cls}):
        try:
            spec = parse_spec(candidate)
        except SpecError:
            continue
        checked(spec)


@SETTINGS
@given(st.text(alphabet=string.ascii_letters + "/.\\_-", min_size=0, max_size=20), st.sampled_from(["split", "city"]))
def test_output_names_either_refused_or_inside(name, key):
    try:
        spec = parse_spec({"classes": [{"name": "car", "prompts": ["a {}"]}], "outputs": {key: name}})
    except SpecError:
        return
    try:
        checked(spec)
    except DatasetError:
        pytest.fail(f"{key} {name!r} validated but leads outside the folder")


@SETTINGS
@given(st.data())
def test_spec_files_cut_or_flipped(tmp_path_factory, data):
    raw = bytearray(EXAMPLE.read_bytes())
    cut = data.draw(st.integers(0, len(raw)))
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path_factory.mktemp("spec") / "s.yaml"
    path.write_bytes(bytes(raw))
    try:
        checked(load_spec(path))
    except SpecError:
        pass


@pytest.fixture(scope="module")
def token_bytes(tmp_path_factory):
    import torch

    from opendaam.optimize import OptimizedToken

    path = tmp_path_factory.mktemp("tok") / "t.safetensors"
    OptimizedToken(torch.zeros(2, 8), "car", {"text_dim": 8, "method": "open_vocab"}).save(path)
    return path.read_bytes()


@SETTINGS
@given(st.data())
def test_token_and_record_files_cut_or_flipped(tmp_path_factory, token_bytes, data):
    raw = bytearray(token_bytes)
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    for _ in range(data.draw(st.integers(0, 3))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path_factory.mktemp("bad") / "t.safetensors"
    path.write_bytes(bytes(raw))
    for check in (check_token_file, check_record_file):
        try:
            check(path)
        except ValueError as error:
            assert str(error).startswith("not an opendaam"), error
