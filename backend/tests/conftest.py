import os

os.environ.setdefault("TQDM_DISABLE", "1")  # SAM-2 draws a progress bar per propagation

import pytest


@pytest.fixture(scope="session")
def sam2_model():
    import torch

    from medsam2_backend.engine.model import load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return load_model(random_weights=True, seed=0)
