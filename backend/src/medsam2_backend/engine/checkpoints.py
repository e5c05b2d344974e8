"""Known MedSAM2 checkpoints: downloaded once from the Hugging Face Hub, verified on every load.

The weights are CC-BY-SA-4.0, published by the MedSAM2 authors in the Hub repository `wanglab/MedSAM2`.
`huggingface_hub` moves the bytes (resume after a dropped connection, progress bar, proxies, `HF_ENDPOINT`,
`HF_HUB_OFFLINE`, `HF_HUB_ETAG_TIMEOUT` / `HF_HUB_DOWNLOAD_TIMEOUT`); this module adds what it does not do:

- the file's SHA-256 is checked against the one the Hub publishes for the LFS file (its ETag); a file that does not
  match is deleted and never loaded;
- the hash and the commit the download resolved to are recorded beside the file (`<file>.verified.json`);
- a cached file is re-hashed against that record on every load *without asking the Hub*, so the model never
  changes under a user; a newer upload is taken only when asked for (`update=True`,
  `medsam2-server --update-checkpoint`).

Files live in `$MEDSAM2_CACHE` (default `~/.cache/medsam2-slicer`) under their Hub names, e.g.
`$MEDSAM2_CACHE/MedSAM2_latest.pt`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import re

from .errors import CheckpointIntegrityError, CheckpointNetworkError, EngineInputError

HUB_REPO = "wanglab/MedSAM2"
DEFAULT_CHECKPOINT = "MedSAM2_latest"
DEMO_TIMEOUT_S = 5.0  # `make demo` falls back to random weights after at most this long without an answer
DEMO_FALLBACK = "Falling back to RANDOM WEIGHTS for this demo: the pipeline runs, but the masks are meaningless."
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HTTP_LIBRARIES = {"httpx", "httpx2", "httpcore", "requests", "urllib3", "ssl", "socket"}
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KnownCheckpoint:
    name: str
    filename: str  # the file's name in the Hub repository and in the cache
    description: str
    repo_id: str = HUB_REPO


KNOWN_CHECKPOINTS = {
    c.name: c
    for c in (
        KnownCheckpoint("MedSAM2_latest", "MedSAM2_latest.pt",
                        "Recommended: MedSAM2 fine-tuned on 3D CT, MR, PET, ultrasound and video."),
        KnownCheckpoint("MedSAM2_2411", "MedSAM2_2411.pt", "The first public MedSAM2 release (November 2024)."),
        KnownCheckpoint("MedSAM2_CTLesion", "MedSAM2_CTLesion.pt", "Fine-tuned for CT lesions."),
        KnownCheckpoint("MedSAM2_MRI_LiverLesion", "MedSAM2_MRI_LiverLesion.pt",
                        "Fine-tuned for liver lesions on MRI."),
        KnownCheckpoint("MedSAM2_US_Heart", "MedSAM2_US_Heart.pt", "Fine-tuned for echocardiography."),
    )
}


@dataclasses.dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint file and what is known about it: its SHA-256 and, for a Hub download, repository and commit."""

    path: pathlib.Path
    sha256: str
    revision: str | None = None  # the Hub commit it was downloaded from
    repo_id: str | None = None


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


def record_path(path: os.PathLike) -> pathlib.Path:
    """Where the hash and revision of a downloaded checkpoint are recorded: beside it."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".verified.json")


def hub_endpoint() -> str:
    """`HF_ENDPOINT` as it is now (huggingface_hub reads it once, at import), else the public Hub."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` as it is now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def verify_recorded(path: os.PathLike) -> VerifiedCheckpoint | None:
    """The checkpoint at `path` checked against the record beside it; None when it has no (readable) record.

    Raises `CheckpointIntegrityError` when the file no longer has the recorded hash: it is never loaded then.
    """
    path = pathlib.Path(path)
    try:
        record = json.loads(record_path(path).read_text(encoding="utf-8"))
        recorded = str(record["sha256"]).lower()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not path.is_file():
        return None
    actual = sha256_of(path)
    if actual != recorded:
        raise CheckpointIntegrityError(
            f"{path} does not match the SHA-256 recorded when it was downloaded ({actual[:12]}…, recorded "
            f"{recorded[:12]}…), so it is corrupt or was replaced and is not loaded: delete it to download it again.")
    return VerifiedCheckpoint(path, actual, record.get("revision"), record.get("repo_id"))


def resolve(checkpoint: os.PathLike | str, *, update: bool = False,
            cache_dir: os.PathLike | None = None) -> VerifiedCheckpoint:
    """A checkpoint file path, or a known name (downloaded once into the cache), as a verified file."""
    path = pathlib.Path(checkpoint)
    known = not path.exists() and str(checkpoint) in KNOWN_CHECKPOINTS
    if update and not known:
        raise EngineInputError(f"Updating applies to known checkpoint names ({', '.join(KNOWN_CHECKPOINTS)}), "
                               f"not to the file {checkpoint}.")
    if known:
        return fetch_known(str(checkpoint), cache_dir, update=update)
    if not path.is_file():
        raise EngineInputError(f"Checkpoint file not found: {path} (known names: {', '.join(KNOWN_CHECKPOINTS)}).")
    return verify_recorded(path) or VerifiedCheckpoint(path, sha256_of(path))


def fetch_known(name: str, cache_dir: os.PathLike | None = None, *, update: bool = False,
                timeout: float | None = None) -> VerifiedCheckpoint:
    """The known checkpoint `name`, from the cache when it is there and verified, else from the Hub.

    `update`: ask the Hub for its current file even when a verified one is cached. `timeout`: seconds to wait for
    the Hub's first answer (default `HF_HUB_ETAG_TIMEOUT`, 10 s).
    """
    if name not in KNOWN_CHECKPOINTS:
        raise EngineInputError(f"Unknown checkpoint {name!r}; known: {', '.join(KNOWN_CHECKPOINTS)}.")
    known = KNOWN_CHECKPOINTS[name]
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / known.filename
    if not update:
        cached = verify_recorded(path)
        if cached is not None:
            return cached
    if hub_offline():
        raise _offline_error(known, folder)
    return _download_verified(known, folder, timeout)


def fetch_for_demo(announce, name: str = DEFAULT_CHECKPOINT, cache_dir: os.PathLike | None = None,
                   timeout: float = DEMO_TIMEOUT_S) -> VerifiedCheckpoint | None:
    """A demo's model: the known checkpoint, or None (random weights) when the Hub cannot be reached.

    `announce(text)` is told loudly why it falls back. Only the network falls back: a hash mismatch or an unknown
    name raises as anywhere else.
    """
    try:
        return fetch_known(name, cache_dir, timeout=timeout)
    except CheckpointNetworkError as error:
        announce(f"{error} {DEMO_FALLBACK}")
        return None


def _download_verified(known: KnownCheckpoint, folder: pathlib.Path, timeout: float | None) -> VerifiedCheckpoint:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = hub_endpoint()
    timeout = constants.HF_HUB_ETAG_TIMEOUT if timeout is None else timeout
    path = folder / known.filename
    try:  # one HEAD, no retries: what the file is now (commit, SHA-256, size), or a fast network failure
        meta = get_hf_file_metadata(hf_hub_url(known.repo_id, known.filename, endpoint=endpoint), timeout=timeout,
                                    endpoint=endpoint)
    except Exception as error:  # noqa: BLE001 - sorted into the user's sentences, anything else re-raised
        sentence = _as_engine_error(error, known, endpoint, folder, "Cannot reach the Hugging Face Hub at "
                                    f"{endpoint} to download {known.filename}")
        if sentence is None:
            raise
        raise sentence from error
    expected = (meta.etag or "").lower()
    if not _SHA256.fullmatch(expected) or not meta.commit_hash:
        raise EngineInputError(
            f"The Hub at {endpoint} publishes no SHA-256 for {known.repo_id}/{known.filename} (ETag {meta.etag!r}), "
            f"so a download cannot be verified: download the file by hand and give its path.")
    if path.is_file() and sha256_of(path) == expected:
        logger.info("%s in %s is the Hub's current file (commit %s)", known.filename, folder, meta.commit_hash)
    else:
        path.unlink(missing_ok=True)  # outdated, corrupt or replaced: never kept next to a record
        size = f" ({meta.size / 1e6:.1f} MB)" if meta.size else ""
        logger.warning("Downloading %s%s from %s/%s (commit %s) into %s", known.filename, size, endpoint,
                       known.repo_id, meta.commit_hash, folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Pinned to the commit the HEAD resolved, so the file is the one whose hash we were told.
            hf_hub_download(known.repo_id, known.filename, revision=meta.commit_hash, local_dir=folder,
                            endpoint=endpoint, etag_timeout=timeout)
        except Exception as error:  # noqa: BLE001 - as above
            path.unlink(missing_ok=True)
            sentence = _as_engine_error(error, known, endpoint, folder, f"The download of {known.filename} from "
                                        f"{endpoint} was interrupted")
            if sentence is None:
                raise
            raise sentence from error
        actual = sha256_of(path)
        if actual != expected:
            path.unlink(missing_ok=True)
            raise CheckpointIntegrityError(
                f"The download of {known.filename} does not match the SHA-256 the Hub publishes for it ({actual}, "
                f"expected {expected}) and was deleted: try again, and if it repeats check the proxy or HF_ENDPOINT.")
    record = {"repo_id": known.repo_id, "filename": known.filename, "revision": meta.commit_hash,
              "sha256": expected, "size": path.stat().st_size, "endpoint": endpoint}
    tmp = record_path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, record_path(path))
    return VerifiedCheckpoint(path, expected, meta.commit_hash, known.repo_id)


def _offline_error(known: KnownCheckpoint, folder: pathlib.Path) -> CheckpointNetworkError:
    return CheckpointNetworkError(
        f"{known.filename} is not in the checkpoint cache {folder} and HF_HUB_OFFLINE is set, so it cannot be "
        f"downloaded: unset HF_HUB_OFFLINE once on a computer with internet, or give a checkpoint file's path.")


def _as_engine_error(error: Exception, known: KnownCheckpoint, endpoint: str, folder: pathlib.Path,
                     network_failure: str) -> EngineInputError | None:
    """The sentence for an error of huggingface_hub or of the network under it; None for any other error (a bug)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return _offline_error(known, folder)
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status < 500 and status not in (408, 429):
            return EngineInputError(
                f"The Hub at {endpoint} refused {known.repo_id}/{known.filename} (HTTP {status}): check the "
                f"checkpoint name and HF_ENDPOINT, or give a checkpoint file's path.")
        return CheckpointNetworkError(f"{network_failure} (the Hub answered HTTP {status}): try again later, or "
                                      f"give a checkpoint file's path.")
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS):
        return EngineInputError(f"Cannot write {known.filename} into {folder} ({error.strerror}): free disk space "
                                f"or set MEDSAM2_CACHE to a writable folder.")
    if isinstance(error, (OSError, TimeoutError)) or type(error).__module__.partition(".")[0] in _HTTP_LIBRARIES:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        return CheckpointNetworkError(f"{network_failure} ({reason}): check the internet connection (and a proxy "
                                      f"or HF_ENDPOINT if you use one), or give a checkpoint file's path.")
    return None
