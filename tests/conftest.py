import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """A tiny random SDXL pipeline folder, written once per test session."""
    from gspn_diffusers.testing import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)
