"""Known MedSAM2 checkpoints and a download that verifies what it fetched.

The weights are CC-BY-SA-4.0, published by the MedSAM2 authors; users download them once into a cache. A file
whose SHA-256 does not match is deleted and never loaded. Entries whose published hash we have not recorded yet
(`sha256=None`) are refused unless the caller gives the expected hash, or explicitly accepts trust-on-first-use,
in which case the hash is written beside the file and checked on every later use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

from .errors import EngineInputError

_BASE_URL = "https://huggingface.co/wanglab/MedSAM2/resolve/main/"


@dataclasses.dataclass(frozen=True)
class KnownCheckpoint:
    name: str
    filename: str
    url: str
    sha256: str | None  # None: not recorded yet; see the module docstring
    description: str


KNOWN_CHECKPOINTS = {
    c.name: c
    for c in (
        KnownCheckpoint("MedSAM2_latest", "MedSAM2_latest.pt", _BASE_URL + "MedSAM2_latest.pt", None,
                        "Recommended: MedSAM2 fine-tuned on 3D CT, MR, PET, ultrasound and video."),
        KnownCheckpoint("MedSAM2_2411", "MedSAM2_2411.pt", _BASE_URL + "MedSAM2_2411.pt", None,
                        "The first public MedSAM2 release (November 2024)."),
        KnownCheckpoint("MedSAM2_CTLesion", "MedSAM2_CTLesion.pt", _BASE_URL + "MedSAM2_CTLesion.pt", None,
                        "Fine-tuned for CT lesions."),
        KnownCheckpoint("MedSAM2_MRI_LiverLesion", "MedSAM2_MRI_LiverLesion.pt",
                        _BASE_URL + "MedSAM2_MRI_LiverLesion.pt", None, "Fine-tuned for liver lesions on MRI."),
        KnownCheckpoint("MedSAM2_US_Heart", "MedSAM2_US_Heart.pt", _BASE_URL + "MedSAM2_US_Heart.pt", None,
                        "Fine-tuned for echocardiography."),
    )
}


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("MEDSAM2_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "medsam2-slicer"


def sha256_of(path: os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: os.PathLike, expected_sha256: str | None, *, trust_on_first_use: bool = False,
             timeout: float = 60.0) -> pathlib.Path:
    """Fetch `url` to `dest` (atomically) and verify its SHA-256. An existing verified file is not fetched again."""
    dest = pathlib.Path(dest)
    pin = dest.with_name(dest.name + ".sha256")
    if expected_sha256 is None and pin.exists():
        expected_sha256 = pin.read_text().strip()
    if expected_sha256 is None and not trust_on_first_use:
        raise EngineInputError(
            f"No SHA-256 is recorded for {dest.name}, so its download cannot be verified. Pass the hash published "
            f"by the MedSAM2 authors, or accept trust-on-first-use explicitly.")
    if dest.exists():
        actual = sha256_of(dest)
        if expected_sha256 is None or actual == expected_sha256.lower():
            if expected_sha256 is None:
                pin.write_text(actual + "\n")
            return dest
        dest.unlink()  # a corrupt or replaced file is never used
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = pathlib.Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                h.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise EngineInputError(f"Could not download {url}: {getattr(e, 'reason', e)}. Check the internet "
                               f"connection, or download the file by hand and give its path.") from None
    actual = h.hexdigest()
    if expected_sha256 is not None and actual != expected_sha256.lower():
        tmp.unlink(missing_ok=True)
        raise EngineInputError(f"The download of {dest.name} is corrupt or not the expected file (SHA-256 "
                               f"{actual}, expected {expected_sha256}); it was deleted.")
    os.replace(tmp, dest)
    if expected_sha256 is None:
        pin.write_text(actual + "\n")
    return dest


def fetch_known(name: str, cache_dir: os.PathLike | None = None, *, expected_sha256: str | None = None,
                trust_on_first_use: bool = False) -> pathlib.Path:
    """Download (once) the known checkpoint `name` into the cache and return its verified path."""
    if name not in KNOWN_CHECKPOINTS:
        raise EngineInputError(f"Unknown checkpoint {name!r}; known: {', '.join(KNOWN_CHECKPOINTS)}.")
    c = KNOWN_CHECKPOINTS[name]
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return download(c.url, folder / c.filename, expected_sha256 or c.sha256, trust_on_first_use=trust_on_first_use)
