"""The shared generation loop: same images and records as a plain traced pipeline call, resume, crash safety,
and the two callers' item types."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_experiments import BoxAnnotator

from opendaam.experiments import Item as ExperimentItem
from opendaam.experiments import generate_items, load_items
from opendaam.generation import Generated, Item, generate_traced
from opendaam.tracing import TraceConfig, trace

CALL = {"num_inference_steps": 2, "height": 32, "width": 32}
CONFIG = TraceConfig(daam_per_step=True, queries=True)
ITEMS = [Item(i, f"a {c} on a street", "a {} on a street", 10 + i, (c,)) for i, c in enumerate(["car", "tree"])]


def _tensors(record) -> dict[str, torch.Tensor]:
    return {n: t for n, t in vars(record).items() if isinstance(t, torch.Tensor)} | {
        f"{n}/{k}": t for n, d in vars(record).items() if isinstance(d, dict)
        for k, t in d.items() if isinstance(t, torch.Tensor)}


class Marked:
    """A writer that writes the image, then the finished marker; can fail once on one item."""

    def __init__(self, root, fail_on=None):
        self.root, self.fail_on, self.written = root, fail_on, []

    def __call__(self, done: Generated) -> None:
        Image.fromarray(done.image).save(self.root / f"{done.item.key}.png")
        if done.item.key == self.fail_on:
            self.fail_on = None
            raise OSError("disk full")
        (self.root / f"{done.item.key}.done").write_text("ok")
        self.written.append(done.item.key)

    def finished(self, item: Item) -> bool:
        return (self.root / f"{item.key}.done").exists()


def test_loop_equals_a_plain_traced_call(tiny_pipe):
    made = []
    generate_traced(tiny_pipe, ITEMS, made.append, config=CONFIG, call=CALL, progress=False,
                    meta=lambda item: {"seed": item.seed})
    assert [g.item for g in made] == ITEMS
    for done, item in zip(made, ITEMS, strict=True):
        with trace(tiny_pipe, CONFIG, prompt=item.prompt, meta={"seed": item.seed}) as tracer:
            pil = tiny_pipe(item.prompt, generator=torch.Generator().manual_seed(item.seed), output_type="pil",
                            **CALL).images[0]
        plain = tracer.records[0]
        assert done.image.dtype == np.uint8 and np.array_equal(done.image, np.asarray(pil))  # diffusers' rounding
        assert done.record.meta == plain.meta and done.record.meta["index"] == 0
        expected, got = _tensors(plain), _tensors(done.record)
        assert sorted(got) == sorted(expected) and len(got) >= 3
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert done.seconds > 0


def test_resume_skips_finished_items_and_traces_nothing_when_all_are(tiny_pipe, tmp_path):
    writer = Marked(tmp_path)
    assert generate_traced(tiny_pipe, ITEMS[:1], writer, config=CONFIG, call=CALL, progress=False) == ITEMS[:1]
    first = (tmp_path / "000000.png").read_bytes()
    again = Marked(tmp_path)
    assert generate_traced(tiny_pipe, ITEMS, again, config=CONFIG, call=CALL, finished=again.finished,
                           progress=False) == ITEMS[1:]
    assert again.written == ["000001"] and (tmp_path / "000000.png").read_bytes() == first
    # nothing left: the pipeline is never touched (an object that is no pipeline would fail to trace)
    assert generate_traced(object(), ITEMS, again, config=CONFIG, finished=again.finished, progress=False) == []


def test_a_crash_mid_item_leaves_no_marker_and_the_rerun_redoes_only_that_item(tiny_pipe, tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    generate_traced(tiny_pipe, ITEMS, Marked(reference), config=CONFIG, call=CALL, progress=False)

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    writer = Marked(crashed, fail_on="000001")  # the image is written, then writing fails before the marker
    with pytest.raises(OSError, match="disk full"):
        generate_traced(tiny_pipe, ITEMS, writer, config=CONFIG, call=CALL, finished=writer.finished, progress=False)
    assert writer.finished(ITEMS[0]) and not writer.finished(ITEMS[1])

    def stop(pipe, step, timestep, kwargs):
        raise KeyboardInterrupt  # a kill during the denoising loop of the pipeline call
    with pytest.raises(KeyboardInterrupt):
        generate_traced(tiny_pipe, ITEMS, writer, config=CONFIG, call=CALL | {"callback_on_step_end": stop},
                        finished=writer.finished, progress=False)
    assert not writer.finished(ITEMS[1])

    assert generate_traced(tiny_pipe, ITEMS, writer, config=CONFIG, call=CALL, finished=writer.finished,
                           progress=False) == ITEMS[1:]
    for key in ("000000", "000001"):
        assert (crashed / f"{key}.png").read_bytes() == (reference / f"{key}.png").read_bytes()


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    """The tiny pipeline as image-to-image."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def test_img2img_gets_the_init_image_and_strength(pipe):
    scene = Image.fromarray(np.full((32, 32, 3), 90, np.uint8))
    made = []
    generate_traced(pipe, ITEMS[:1], made.append, config=CONFIG, call={"num_inference_steps": 4},
                    init_image=lambda item: scene, strength=0.5, progress=False)
    plain = pipe(ITEMS[0].prompt, image=scene, strength=0.5, num_inference_steps=4, output_type="pil",
                 generator=torch.Generator().manual_seed(ITEMS[0].seed)).images[0]
    assert np.array_equal(made[0].image, np.asarray(plain))
    assert made[0].record.meta["calls"] == 2  # strength 0.5 of 4 steps: the last two run


def test_item_keys_and_single_class():
    assert Item(7, "a car", "a {}", 0, ("car",)).key == "000007"
    assert Item(7, "a car", "a {}", 0, ("car",), stem="car_0").id == "car_0"
    with pytest.raises(ValueError, match=r"shows 2 classes \['car', 'tree'\]; .cls is for single-class items"):
        _ = Item(0, "a car and a tree", "a {car} and a {tree}", 0, ("car", "tree")).cls
    experiment = ExperimentItem("car_3", "car", "a car", 3, "records/car_3.safetensors", "masks/car_3.png",
                                "images/car_3.png")
    assert isinstance(experiment, Item) and experiment.key == "car_3" and experiment.classes == ("car",)


def test_experiment_items_resume_to_the_same_bytes(pipe, tmp_path):
    out, classes, call = tmp_path / "data", ("car", "traffic light"), {"num_inference_steps": 2}
    items = generate_items(pipe, out, classes, 2, annotator=BoxAnnotator(), call=call, progress=False)
    assert [i.id for i in items] == ["car_0", "car_1", "traffic_light_0", "traffic_light_1"]
    assert [i.index for i in items] == [0, 1, 2, 3] and load_items(out) == items
    listing = json.loads((out / "items.json").read_text())
    assert listing["items"][2] == {"id": "traffic_light_0", "cls": "traffic light",
                                   "prompt": "a traffic light in an urban environment", "seed": 0,
                                   "record": "records/traffic_light_0.safetensors",
                                   "mask": "masks/traffic_light_0.png", "image": "images/traffic_light_0.png"}
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / items[2].record).unlink()  # as if killed before the record (the finished marker) was written
    (out / items[2].image).unlink()
    generate_items(pipe, out, classes, 2, annotator=BoxAnnotator(), call=call, progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the regenerated record does not depend on how many items the rerun skipped
