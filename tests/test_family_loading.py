"""The real loading path for every family: pipelines built from configs, written with save_pretrained, loaded
with opendaam.load_pipeline (as a hub id or folder would be), traced; unsupported denoisers refused before any
weight is read."""

import json

import numpy as np
import pytest
import torch

import opendaam
from opendaam._tiny import build_tiny_pipeline
from opendaam.models import check_denoiser, generation_defaults


@pytest.mark.parametrize("family, steps, guidance", [("sdxl", 50, 5.0), ("pixart-sigma", 20, 4.5), ("sd3.5", 28, 7.0),
                                                     ("flux", 28, 3.5)])
def test_saved_pipeline_loads_and_traces(tmp_path, family, steps, guidance):
    built = build_tiny_pipeline(family, seed=0)
    built.save_pretrained(tmp_path)
    pipe = opendaam.load_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is type(built)
    defaults = generation_defaults(pipe)  # the pipeline's own defaults, not Stable Diffusion's
    assert (defaults["num_inference_steps"], defaults["guidance_scale"]) == (steps, guidance)
    options = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    if family.startswith("pixart"):
        options.update(use_resolution_binning=False, clean_caption=False)
    plain = pipe("a red car", generator=torch.Generator().manual_seed(0), **options).images
    with opendaam.trace(pipe) as tracer:
        traced = pipe("a red car", generator=torch.Generator().manual_seed(0), **options).images
    assert np.array_equal(plain, traced)
    record = tracer.records[0]
    assert record.meta["model"] == str(tmp_path) and record.meta["prompt"] == "a red car"
    path = record.save(tmp_path / "car.safetensors")
    again = opendaam.load_record(path)
    assert torch.equal(opendaam.heatmaps(again, "car").latent, opendaam.heatmaps(record, "car").latent)


def test_unsupported_denoiser_refused_before_loading(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ValueError, match=r"cannot trace a UNet2DModel denoiser; supported: U-Net cross-attention "
                                         r"\(Stable Diffusion 1/2, SDXL\) \(UNet2DConditionModel\); DiT"):
        opendaam.load_pipeline(tmp_path)  # no weights exist there: the check comes first
    assert check_denoiser({"unet": ["diffusers", "UNet2DConditionModel"]}).startswith("U-Net")
