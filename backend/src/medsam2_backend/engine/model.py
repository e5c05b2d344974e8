"""Build SAM-2 hiera-tiny at 512 px exactly as MedSAM2 configures it, and load a MedSAM2 checkpoint into it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib

import torch
from medsam2_client import protocol

from .errors import EngineInputError

SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
IMAGE_SIZE = 512
# MedSAM2's sam2.1_hiera_t512.yaml is the packaged hiera-tiny config with these three changes.
MEDSAM2_OVERRIDES = (
    f"++model.image_size={IMAGE_SIZE}",
    "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
)
# A click on an already-tracked slice becomes a conditioning frame (SAM-2's default keeps it a non-conditioning
# output that re-propagation recomputes without the click: the correction would be lost). SAM-2 trains this way.
CORRECTION_OVERRIDES = ("++model.add_all_frames_to_correct_as_cond=true",)
# How the engine configures SAM-2; a reference predictor compared with the engine must be built with the same.
SAM2_OVERRIDES = MEDSAM2_OVERRIDES + CORRECTION_OVERRIDES
PRECISIONS = protocol.PRECISIONS
KERNELS = ("onednn", "torch")
RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: the model is randomly initialised, not MedSAM2. Masks are meaningless; "
    "use this only to test the pipeline.")


def shout(text: str, stream=None) -> None:
    """Print `text` between lines of '!' so nobody misses it (random weights), on stderr by default."""
    import sys

    line = "!" * min(100, len(text) + 8)
    print(f"\n{line}\n!!! {text}\n{line}\n", file=stream or sys.stderr, flush=True)


@dataclasses.dataclass
class Sam2Model:
    """A ready SAM-2 video predictor plus what a user needs to know about it."""

    predictor: torch.nn.Module
    device: torch.device
    precision: str
    checkpoint_name: str  # file name, or "random weights"
    checkpoint_sha256: str | None
    kernels: str = "torch"  # "onednn": fp32 linear layers prepacked for oneDNN (CPU), see cpu_kernels
    checkpoint_revision: str | None = None  # the Hub commit a known checkpoint was downloaded from
    checkpoint_source: str | None = None  # its Hub repository

    @property
    def random_weights(self) -> bool:
        return self.checkpoint_sha256 is None

    @property
    def image_size(self) -> int:
        return self.predictor.image_size

    def autocast(self):
        """bf16 autocast when asked for, else nothing (fp32)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> dict:
        return {"model": "SAM-2 hiera-tiny (MedSAM2 configuration)", "image_size": self.image_size,
                "checkpoint": self.checkpoint_name, "checkpoint_sha256": self.checkpoint_sha256,
                "checkpoint_revision": self.checkpoint_revision, "checkpoint_source": self.checkpoint_source,
                "random_weights": self.random_weights, "device": str(self.device), "precision": self.precision,
                "kernels": self.kernels}


def pick_device(requested: str | None = None) -> torch.device:
    """cuda, else mps, else cpu, unless a device is named."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise EngineInputError(f"Unknown device {requested!r}; use cpu, cuda, cuda:N or mps.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineInputError("CUDA was requested but no CUDA GPU is available to PyTorch here.")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise EngineInputError("MPS was requested but is not available on this computer.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_precision(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def build_predictor(device: torch.device, seed: int | None = None) -> torch.nn.Module:
    """The MedSAM2-configured SAM-2 video predictor with random weights (seeded when `seed` is given)."""
    from sam2.build_sam import build_sam2_video_predictor

    if seed is not None:
        torch.manual_seed(seed)
    predictor = build_sam2_video_predictor(
        SAM2_CONFIG, ckpt_path=None, device=str(device),
        hydra_overrides_extra=list(SAM2_OVERRIDES)
        + ["++model._target_=medsam2_backend.engine.sam2_engine.CachingVideoPredictor"])
    if not _has_sam2_cuda_extension():
        # The hole filling SAM-2 applies to low-res masks needs its CUDA extension; without it SAM-2 skips the
        # step with a warning per frame. Switching it off gives the same masks without the noise.
        predictor.fill_hole_area = 0
    return predictor


def _has_sam2_cuda_extension() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def load_state_dict(predictor: torch.nn.Module, path: os.PathLike) -> None:
    """Load a MedSAM2/SAM-2 checkpoint strictly, with an error that names the file and what is wrong."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise EngineInputError(f"Checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a checkpoint we can read"
        raise EngineInputError(f"{path.name} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") \
            from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EngineInputError(f"{path.name} holds no model weights (expected a dict with a 'model' entry).")
    own = predictor.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("with a different shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise EngineInputError(
            f"{path.name} does not fit SAM-2 hiera-tiny at {IMAGE_SIZE} px as MedSAM2 uses it: "
            f"{'; '.join(parts)} tensors. Is it a MedSAM2 checkpoint?")
    predictor.load_state_dict(state, strict=True)


def default_kernels(device: torch.device, precision: str) -> str:
    from .cpu_kernels import onednn_available

    return "onednn" if device.type == "cpu" and precision == "fp32" and onednn_available() else "torch"


def load_model(checkpoint: os.PathLike | str | None = None, *, device: str | None = None,
               precision: str | None = None, random_weights: bool = False, seed: int | None = 0,
               update_checkpoint: bool = False, kernels: str | None = None) -> Sam2Model:
    """The model for a checkpoint path, a known checkpoint name, or random weights (only when asked for).

    A known name loads its verified cached file without asking the Hub (downloaded on first use, see
    `checkpoints`); `update_checkpoint` asks the Hub for its current file first.
    `kernels`: "onednn" (default on the CPU in fp32: the same fp32 arithmetic, faster) or "torch".
    """
    dev = pick_device(device)
    precision = precision or default_precision(dev)
    if precision not in PRECISIONS:
        raise EngineInputError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    kernels = kernels or default_kernels(dev, precision)
    if kernels not in KERNELS or (kernels == "onednn" and default_kernels(dev, precision) != "onednn"):
        raise EngineInputError(f"Kernels {kernels!r} are not available for {dev.type} {precision}; use "
                               f"'torch' (or 'onednn' on a CPU in fp32).")
    if (checkpoint is None) == (not random_weights):
        raise EngineInputError("Give a MedSAM2 checkpoint (a file path or a known name), or ask explicitly for "
                               "random weights - not both, not neither.")
    if random_weights:
        shout(RANDOM_WEIGHTS_WARNING)  # every entry point (CLI, server, Python) says it once, loudly
        predictor, verified = build_predictor(dev, seed), None
    else:
        from .checkpoints import resolve

        verified = resolve(checkpoint, update=update_checkpoint)  # raises before the model is built
        predictor = build_predictor(dev)
        load_state_dict(predictor, verified.path)
    if kernels == "onednn":
        from .cpu_kernels import pack_linear_layers

        pack_linear_layers(predictor)
    if verified is None:
        return Sam2Model(predictor, dev, precision, "random weights", None, kernels)
    return Sam2Model(predictor, dev, precision, verified.path.name, verified.sha256, kernels, verified.revision,
                     verified.repo_id)
