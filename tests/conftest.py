"""Shared fixtures: a tiny pipeline built from config (random weights, fast, diffusers-style) and
the shipped embedded model."""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def random_pipe():
    """The tiny architecture with random weights (seeded): for unit tests that need no training."""
    from mcteach.sd import pretrain, tiny
    from mcteach.world import scenes

    tokenizer = tiny.build_tokenizer(scenes.vocabulary_words(scenes.BASE_CLASSES))
    vae, text_encoder, unet, _ = tiny.build_components(tokenizer, seed=0)
    pipe = pretrain.assemble(tokenizer, vae, text_encoder, unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def pipe():
    """The embedded model shipped in data/tiny-sd, on CPU."""
    from mcteach.sd.pipeline import load_pipeline

    return load_pipeline(device="cpu")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
