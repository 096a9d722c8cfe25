"""The rebuilt tracer: prompts read from each pipeline call, traces closed out of order, interrupted
generations, adapters for unsupported pipelines, and records checked when loaded."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import generate

from opendaam.cache import load_record
from opendaam.heatmaps import METHODS, get_method, heatmaps
from opendaam.tracing import adapter_for, trace
from opendaam.tracing.hooks import _RecordingProcessor


def test_every_call_names_its_own_records(tiny_pipe):
    """Two pipeline calls under one trace without prompt=: each record carries its own call's tokens, so a word
    of the first prompt is not found in the second record (it used to return another word's map)."""
    with trace(tiny_pipe) as tracer:
        generate(tiny_pipe, prompt="a red car", seed=0)
        generate(tiny_pipe, prompt=["a person", "a green tree"], seed=1)
    first, person, tree = tracer.records
    assert first.meta["prompt"] == "a red car" and first.tokens[1:4] == ["a</w>", "red</w>", "car</w>"]
    assert person.meta["prompt"] == "a person" and tree.meta["prompt"] == "a green tree"
    assert person.meta["token_ids"] == tiny_pipe.tokenizer("a person").input_ids
    with pytest.raises(KeyError, match="'car' is not in the prompt"):
        heatmaps(person, "car")
    # the map by word equals the map by the token index the tokenizer gives
    assert tree.tokens[3] == "tree</w>" and torch.equal(heatmaps(tree, "tree").latent, heatmaps(tree, [3]).latent)


def test_named_prompt_that_disagrees_with_the_call_warns(tiny_pipe):
    with trace(tiny_pipe, prompt="a red car") as tracer:
        generate(tiny_pipe, prompt="a red car", seed=0)
        with pytest.warns(UserWarning, match="not what the pipeline encoded"):
            generate(tiny_pipe, prompt="a person", seed=0)
            records = tracer.records
    assert [r.meta["prompt"] for r in records] == ["a red car", "a person"]


def test_prompt_embeds_without_a_name_have_no_words(tiny_pipe):
    """Given only prompt_embeds (the pipeline encodes just the negative prompt), the prompt cannot be known:
    maps by word raise an error that names the fix; with the prompt named, words work."""
    embeds, negative = tiny_pipe.encode_prompt("a red car", "cpu", 1, True)
    with trace(tiny_pipe) as tracer:
        tiny_pipe(prompt_embeds=embeds, num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    record = tracer.records[0]
    assert record.tokens is None
    with pytest.raises(ValueError, match="prompt="):
        heatmaps(record, "car")
    with trace(tiny_pipe, prompt="a red car") as tracer:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing contradicts the name: no warning
            tiny_pipe(prompt_embeds=embeds, num_inference_steps=2, height=32, width=32, output_type="np",
                      generator=torch.Generator().manual_seed(0))
    named = tracer.records[0]
    assert named.tokens[3] == "car</w>"
    assert torch.equal(heatmaps(named, "car").latent, heatmaps(record, [3]).latent)


def test_new_words_encoded_between_calls_do_not_name_the_next_call(tiny_pipe):
    """opendaam's own text encoding (open_vocab of a new word) between generations is not taken for the next
    generation's prompt."""
    with trace(tiny_pipe, queries=True) as tracer:
        generate(tiny_pipe, prompt="a red car", seed=0)
        heatmaps(tracer.pop_records()[0], "tree", method="open_vocab", pipe=tiny_pipe)
        generate(tiny_pipe, prompt="a person", seed=0)
    assert tracer.records[0].meta["prompt"] == "a person"


def test_traces_closed_out_of_order_leave_no_recorder(tiny_pipe):
    before = dict(tiny_pipe.unet.attn_processors)
    outer = trace(tiny_pipe)
    inner = trace(tiny_pipe)
    t_outer = outer.__enter__()
    t_inner = inner.__enter__()
    outer.__exit__(None, None, None)  # the first one closes first
    generate(tiny_pipe, prompt="a red car")  # the inner trace still records
    inner.__exit__(None, None, None)
    after = tiny_pipe.unet.attn_processors
    assert not any(isinstance(p, _RecordingProcessor) for p in after.values())
    assert all(after[k] is before[k] for k in before)
    assert not tiny_pipe.unet._forward_pre_hooks and not tiny_pipe.text_encoder._forward_hooks
    assert len(t_inner.records) == 1 and t_outer.records == []


def test_interrupted_generation_is_marked_incomplete(tiny_pipe):
    def stop(pipe, step, timestep, kwargs):
        if step == 1:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        with trace(tiny_pipe) as tracer:
            generate(tiny_pipe, num_inference_steps=4, callback_on_step_end=stop)
    record = tracer.records[0]
    assert record.meta["complete"] is False and record.meta["calls"] == 2
    with trace(tiny_pipe) as tracer:
        generate(tiny_pipe, num_inference_steps=4)
    assert tracer.records[0].meta["complete"] is True and tracer.records[0].meta["calls"] == 4


def test_unsupported_pipeline_names_the_families():
    class StableDiffusion3Like:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"cannot trace StableDiffusion3Like: its denoiser is Linear\. "
                                         r"Supported families: U-Net cross-attention"):
        adapter_for(StableDiffusion3Like())


def test_one_method_registry():
    assert list(METHODS) == ["daam", "open_vocab", "linear"]
    assert [get_method(m).normalization for m in METHODS] == ["max", "max", "minmax"]
    with pytest.raises(ValueError, match="unknown method 'daaam'; choose one of: daam, open_vocab, linear"):
        get_method("daaam")


@pytest.fixture(scope="module")
def saved_record(tmp_path_factory, tiny_pipe):
    with trace(tiny_pipe, queries=True) as tracer:
        generate(tiny_pipe, prompt="a red car")
    return tracer.records[0].save(tmp_path_factory.mktemp("rec") / "r.safetensors")


def test_corrupt_files_are_not_records(tmp_path, saved_record):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(saved_record.read_bytes()[:1000])
    pickled = tmp_path / "pickle.safetensors"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    for path in (truncated, pickled):
        with pytest.raises(ValueError, match=f"not an opendaam record: {path}"):
            load_record(path)


def test_edited_metadata_is_refused(tmp_path, saved_record):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved_record), framework="pt") as handle:
        header = json.loads(handle.metadata()["opendaam"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    for name, edits, problem in (
        ("latent", {"latent_size": [32, 32], "image_size": [64, 64]},
         "linear_map has 256 rows but the latent is 32x32"),
        ("shape", {"image_size": [48, 32]}, r"image_size \[48, 32\] is not the latent size \[16, 16\] times the VAE"),
        ("size", {"image_size": [64, 64]}, r"image_size \[64, 64\] is not the latent size \[16, 16\] times the "
                                           "VAE's factor 2"),
        ("width", {"text_dim": 64}, "context is 32 wide but text_dim is 64"),
    ):
        edited = json.loads(json.dumps(header))
        edited["meta"].update(edits)
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"opendaam": json.dumps(edited)})
        with pytest.raises(ValueError, match=f"disagree with its metadata: {problem}"):
            load_record(path)
    layer = header["layers"][0]
    edited = json.loads(json.dumps(header))
    edited["layers"][0] = {**layer, "heads": layer["heads"] * 2}
    path = tmp_path / "heads.safetensors"
    save_file(tensors, str(path), metadata={"opendaam": json.dumps(edited)})
    with pytest.raises(ValueError, match=r"daam\[.*\] is \(\d+, \d+, 77\), its layer's geometry says"):
        load_record(path)
    assert load_record(saved_record).meta["prompt"] == "a red car"


def test_plot_on_a_matplotlib_axis(tiny_pipe):
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib (the eval extra) is not installed")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with trace(tiny_pipe) as tracer:
        image = generate(tiny_pipe, prompt="a red car")[0]
    maps = heatmaps(tracer.records[0], ["car", "red"])
    fig, ax = plt.subplots()
    assert maps.plot("red", image=image, ax=ax) is ax and ax.get_title() == "red (daam)"
    shown = ax.get_images()[-1].get_array()
    assert shown.shape == (32, 32) and np.allclose(np.asarray(shown), maps.normalized()[1].numpy())
    plt.close(fig)
