"""The segmentation engines. `Sam2Engine` needs torch and sam2; everything else here needs only numpy/scipy."""

from medsam2_client import protocol

from .base import (BACKWARD, DIRECTIONS, FORWARD, POSTPROCESS_STEPS, PropagationRun, PropagationSummary,
                   SlicePrompt, SliceResult, VolumeSession)
from .errors import EngineInputError
from .preprocess import CT_PRESETS, RESIZE_MODES, Preprocessing
from .test_engine import DiskEngine

__all__ = ["BACKWARD", "CT_PRESETS", "DIRECTIONS", "DiskEngine", "EngineInputError", "FORWARD",
           "POSTPROCESS_STEPS", "Preprocessing", "PropagationRun", "PropagationSummary", "RESIZE_MODES",
           "SlicePrompt", "SliceResult", "VolumeSession", "load_engine"]


def load_engine(checkpoint=None, *, device=None, precision=None, random_weights=False, seed=0,
                cache_budget_bytes=protocol.DEFAULT_CACHE_BUDGET_BYTES, update_checkpoint=False, kernels=None):
    """A SAM-2 engine for a MedSAM2 checkpoint (path or known name), or random weights when asked for."""
    from .model import load_model
    from .sam2_engine import Sam2Engine

    model = load_model(checkpoint, device=device, precision=precision, random_weights=random_weights, seed=seed,
                       update_checkpoint=update_checkpoint, kernels=kernels)
    return Sam2Engine(model, cache_budget_bytes)
