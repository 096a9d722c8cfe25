"""Shared fixtures: tiny random pipelines (built offline), one thread."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe():
    from opendaam.models import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a red car in a city", seed=0, **kwargs):
    """Run the pipeline with a fixed seed and small defaults; returns numpy images."""
    options = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    options.update(kwargs)
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=gen, **options).images
