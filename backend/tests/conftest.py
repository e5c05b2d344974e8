import os

os.environ.setdefault("TQDM_DISABLE", "1")  # SAM-2 draws a progress bar per propagation

import pytest


@pytest.fixture(scope="session")
def sam2_model():
    import torch

    from medsam2_backend.engine.model import load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return load_model(random_weights=True, seed=0)


def pytest_collection_modifyitems(items):
    """Every test that runs SAM-2 (through the shared model or a module marked `sam2`) carries the marker."""
    for item in items:
        if "sam2_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.sam2)
