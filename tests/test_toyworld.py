"""The procedural world and the toy-urban architecture (no training here)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from opendaam.toyworld.model import ToyConfig, build_toy_pipeline, toy_components
from opendaam.toyworld.scene import CLASSES, LABEL_IDS, LOOKALIKE_CLASSES, WorldConfig, render_scene
from opendaam.toyworld.train import caption_gap, render_dataset

torch.set_num_threads(1)  # the other core trains; tests never train

PINNED = "508c31320178d6b3"  # sha256 prefix of scenes 0-3 (image, labels, caption) as the model saw them


def test_same_seed_same_scene_masks_caption():
    a, b = render_scene(123), render_scene(123)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.caption == b.caption
    c = render_scene(124)
    assert not np.array_equal(a.image, c.image)


def test_label_ids_are_cityscapes():
    ids = set()
    for seed in range(40):
        ids |= set(np.unique(render_scene(seed).labels).tolist())
    assert ids <= set(LABEL_IDS.values())
    assert {7, 8, 11, 23} <= ids  # road, sidewalk, building, sky in every street


@pytest.mark.parametrize("cls", CLASSES + LOOKALIKE_CLASSES)
def test_main_object_is_large(cls):
    fractions = [render_scene(seed, cls=cls).mask(cls).mean() for seed in range(30)]
    assert min(fractions) > 0.02 and 0.05 < float(np.mean(fractions)) < 0.4


def test_cars_stand_at_many_depths():
    """Cars move up the road and shrink with depth, so the mean car mask is no car detector."""
    lowest, areas = [], []
    for seed in range(80):
        mask = render_scene(seed, cls="car").mask("car")
        lowest.append(int(np.nonzero(mask)[0].max()))
        areas.append(float(mask.mean()))
    assert max(lowest) - min(lowest) >= 16  # wheels anywhere from just under the kerb to the image's bottom
    assert min(areas) < 0.08 < 0.16 < max(areas)  # far cars small, near cars large
    assert np.corrcoef(lowest, areas)[0, 1] > 0.5  # nearer (lower) cars are larger


def test_traffic_light_pole_is_pole_over_many_seeds():
    with_pole = 0
    for seed in range(60):
        scene = render_scene(seed, cls="traffic light")
        light, pole = scene.mask("traffic light"), scene.mask("pole")
        assert light.any() and not (light & pole).any()
        if pole.any():  # a tall housing can hide the whole pole
            with_pole += 1
            # the pole stands under the housing: its pixels reach below the light's lowest row
            assert np.nonzero(pole)[0].max() > np.nonzero(light)[0].max()
    assert with_pole > 20  # 33 of these 60 show some pole


def test_scene_values_are_pinned():
    """Same seed, same pixels on any machine: pin a checksum of a few scenes (PCG64 + aliased PIL)."""
    import hashlib

    digest = hashlib.sha256()
    for seed in (0, 1, 2, 3):
        scene = render_scene(seed)
        digest.update(scene.image.tobytes() + scene.labels.tobytes() + scene.caption.encode())
    assert digest.hexdigest()[:16] == PINNED


def test_annotation_rules():
    light = render_scene(5, cls="traffic light")
    assert light.mask("pole").any() and not (light.mask("pole") & light.mask("traffic light")).any()
    rider = render_scene(5, cls="rider")
    vehicle = rider.mask("bicycle") | rider.mask("motorcycle")
    assert vehicle.any() and rider.mask("rider").any() and not (vehicle & rider.mask("rider")).any()


def test_lookalikes_share_and_labels():
    """30% of scenes show a look-alike main object, 10% each; each keeps its own Cityscapes label."""
    picks = [render_scene(seed).cls for seed in range(1500)]
    share = {c: picks.count(c) / len(picks) for c in CLASSES + LOOKALIKE_CLASSES}
    assert all(0.07 < share[c] < 0.13 for c in LOOKALIKE_CLASSES), share
    assert all(0.14 < share[c] < 0.21 for c in CLASSES), share
    no_lookalikes = WorldConfig(lookalike_share=0.0)
    assert {render_scene(seed, no_lookalikes).cls for seed in range(200)} <= set(CLASSES)
    for cls, ids in (("bus", {28}), ("truck", {27}), ("traffic sign", {20, 17})):
        scene = render_scene(1000, cls=cls)
        drawn = set(np.unique(scene.labels).tolist()) - {7, 8, 11, 21, 23}
        assert drawn == ids
    captions = [render_scene(seed, cls="traffic sign").caption for seed in range(40)]
    assert all(c == "" or "traffic sign" in c for c in captions) and sum(c == "" for c in captions) < 10


def test_lookalikes_match_their_thesis_class_in_size():
    """At coarse scale a bus or truck covers about what a car does, a sign stack about what a traffic light does."""
    def area(cls):
        return float(np.mean([render_scene(10**6 + i, cls=cls).mask(cls).mean() for i in range(60)]))

    car, light = area("car"), area("traffic light")
    assert 0.8 < area("bus") / car < 1.5 and 0.8 < area("truck") / car < 1.5
    assert 0.6 < area("traffic sign") / light < 1.2


def test_traffic_sign_pole_is_pole():
    with_pole = 0
    for seed in range(30):
        scene = render_scene(seed, cls="traffic sign")
        sign, pole = scene.mask("traffic sign"), scene.mask("pole")
        assert sign.any()
        if pole.any():  # like a traffic light's, a tall stack of plates can hide most of its pole
            with_pole += 1
            cols = np.nonzero(sign)[1]
            assert cols.min() <= np.nonzero(pole)[1].min() and np.nonzero(pole)[1].max() <= cols.max()
    assert with_pole > 20


def test_unknown_class_lists_the_classes():
    with pytest.raises(ValueError, match="unknown class 'tram'.*car, person, traffic light, rider, bus"):
        render_scene(0, cls="tram")


def test_captions_follow_the_recipe():
    captions = [render_scene(seed).caption for seed in range(400)]
    template = sum(c.endswith("in an urban environment") and c.count(" ") == 5 or
                   c in ("a traffic light in an urban environment", "a traffic sign in an urban environment")
                   for c in captions) / len(captions)
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.5 < template < 0.85 and 0.04 < empty < 0.18
    assert WorldConfig().template_share == 0.7


def test_architecture_round_trip(tmp_path):
    parts = toy_components(ToyConfig(), seed=0)
    assert parts["text_encoder"].config.num_hidden_layers == 0
    pipe = build_toy_pipeline(parts)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    pipe.save_pretrained(tmp_path)
    from opendaam.models import cross_attention_layers, load_pipeline

    loaded = load_pipeline(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    names = list(cross_attention_layers(loaded.unet))
    assert any(n.startswith("mid_block") for n in names) and any(n.startswith("down_blocks.2") for n in names)
    image = loaded("a car", num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_export_keeps_the_folder_docs_and_halves_unet_and_vae(tmp_path):
    import json

    from safetensors import safe_open

    from opendaam.toyworld.train import export_pipeline

    build_toy_pipeline(toy_components(ToyConfig(), seed=0)).save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "opendaam.json").write_text('{"num_inference_steps": 20}')
    dest = tmp_path / "toy-urban"
    dest.mkdir()
    (dest / "TRAINING.md").write_text("how these weights were made")
    (dest / "stale.bin").write_text("old")
    export_pipeline(tmp_path / "run", dest)
    assert (dest / "TRAINING.md").read_text() == "how these weights were made" and not (dest / "stale.bin").exists()
    assert json.loads((dest / "model_index.json").read_text())["_name_or_path"] == "toy-urban"
    assert json.loads((dest / "opendaam.json").read_text()) == {"num_inference_steps": 20}
    with safe_open(str(dest / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    with safe_open(str(dest / "text_encoder" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float32


def test_caption_gap_is_zero_for_a_text_blind_model():
    parts = toy_components(ToyConfig(), seed=0)
    images, _, classes = render_dataset([10**6 + i for i in range(4)], list(CLASSES))
    with torch.no_grad():
        latents = parts["vae"].encode(images).latent_dist.mean
    zero_text = parts["text_encoder"]
    with torch.no_grad():
        for p in zero_text.parameters():
            p.zero_()
    gap = caption_gap(parts["unet"], zero_text, parts["tokenizer"], latents, classes, parts["scheduler"])
    assert gap["wrong_gap"] == pytest.approx(0.0, abs=1e-6) and gap["empty_gap"] == pytest.approx(0.0, abs=1e-6)


def test_annotator_outputs_cityscapes_ids():
    from opendaam.toyworld.annotate import SegNet, annotate

    labels = annotate([render_scene(s).image for s in range(2)], SegNet())
    assert labels.shape == (2, 64, 64) and set(np.unique(labels).tolist()) <= set(LABEL_IDS.values())


def test_img2img_scene_returns_the_rendered_labels():
    from diffusers import StableDiffusionImg2ImgPipeline

    from opendaam.toyworld.annotate import img2img_scene

    pipe = StableDiffusionImg2ImgPipeline(**toy_components(ToyConfig(), seed=0), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image, labels, scene = img2img_scene(pipe, 10**6, cls="car", strength=0.5, num_inference_steps=2)
    assert image.size == (64, 64) and np.array_equal(labels, render_scene(10**6, cls="car").labels)


def test_bundled_model_is_deterministic():
    from opendaam.models import BUNDLED_MODELS, load_pipeline

    if not (BUNDLED_MODELS["toy-urban"] / "model_index.json").exists():
        pytest.skip("toy-urban weights not installed")
    pipe = load_pipeline("toy-urban")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    runs = [pipe("a car in an urban environment", num_inference_steps=4, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images for _ in range(2)]
    assert runs[0].shape == (1, 64, 64, 3) and np.array_equal(runs[0], runs[1])


def test_bundled_annotator_labels_rendered_scenes():
    from opendaam.toyworld.annotate import ANNOTATOR_DIR, annotate, load_annotator

    if not (ANNOTATOR_DIR / "model.safetensors").exists():
        pytest.skip("annotator weights not installed")
    scenes = [render_scene(10**6 + 900 + i, cls=c) for i, c in enumerate(CLASSES + LOOKALIKE_CLASSES)]
    labels = annotate([s.image for s in scenes], load_annotator())
    for scene, pred in zip(scenes, labels, strict=True):
        truth, guess = scene.mask(scene.cls), pred == LABEL_IDS[scene.cls]
        assert (truth & guess).sum() / (truth | guess).sum() > 0.6


def test_subpackages_are_attributes_after_import_opendaam():
    code = ("import sys, opendaam; assert 'opendaam.toyworld' not in sys.modules; "
            "print(opendaam.toyworld.render_scene(3).cls, opendaam.metrics.iou_score.__name__); opendaam.nope")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [render_scene(3).cls, "iou_score"]
    assert "AttributeError: module 'opendaam' has no attribute 'nope'" in done.stderr


def test_train_cli_refuses_a_share_outside_0_1(tmp_path):
    """The share is checked before anything renders or trains (tests never train)."""
    from opendaam.cli import main

    with pytest.raises(SystemExit, match="--lookalike-share: lookalike_share must be between 0 and 1, got 1.5"):
        main(["toyworld", "train", "--out", str(tmp_path / "run"), "--lookalike-share", "1.5"])
    assert not (tmp_path / "run").exists()


def test_render_cli_names_the_classes_for_an_unknown_one(tmp_path):
    from opendaam.cli import main

    with pytest.raises(SystemExit, match="--class: unknown class 'tram'; choose one of: car, .*traffic sign"):
        main(["toyworld", "render", "--seed", "1", "--class", "tram", "--out", str(tmp_path)])


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": ("car", "bus")}, r"cannot draw \['bus'\]; classes come from"),
    ({"lookalike_classes": ("tram",)}, r"cannot draw \['tram'\]"),
    ({"lookalike_share": -0.1}, "lookalike_share must be between 0 and 1, got -0.1"),
    ({"template_share": 0.95}, "template_share \\+ empty_share must be at most 1, got 0.95 \\+ 0.1"),
])
def test_world_config_refuses_what_it_cannot_draw(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**kwargs)


def test_resume_on_another_world_is_refused(tmp_path):
    """A run folder remembers its world; resuming it with other settings would mix two worlds."""
    import json
    from dataclasses import asdict

    from opendaam.toyworld.train import train

    world = json.dumps(asdict(WorldConfig(lookalike_share=0.1)), sort_keys=True)
    torch.save({"world": world}, tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="holds a run on another world .*lookalike_share.: 0.1.*train into a new"):
        train(tmp_path, world=WorldConfig())


def test_caption_gap_names_the_classes_it_measures():
    parts = toy_components(ToyConfig(), seed=0)
    with pytest.raises(ValueError, match=r"measures the thesis classes .*got \['bus'\]"):
        caption_gap(parts["unet"], parts["text_encoder"], parts["tokenizer"], torch.zeros(2, 4, 16, 16),
                    ["car", "bus"], parts["scheduler"])
