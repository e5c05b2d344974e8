"""What ITK does not check in a NIfTI file: that its voxels are all there, and that its two transforms agree.

ITK's NIfTI reader fills a truncated file (.nii, or a cut .nii.gz stream) with whatever memory held, without an
error, so the size the header announces is checked here first. A NIfTI file carries two transforms, the qform and
the sform; ITK (and so Slicer) picks one of them by its own rule, nibabel-based tools often the other. Where both are
set and differ, the user is told which one the outputs follow, and the NIfTI label map written for a NIfTI input
gets the input's own qform and sform fields, so every tool places it exactly where it places the input.
"""

from __future__ import annotations

import gzip
import pathlib
import struct
import zlib

import numpy as np

from .errors import CaseInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_NIFTI1 = 348
# NIfTI-1 header fields of the two transforms: pixdim[0..3] (qfac and the voxel size, float32 at 76..92),
# qform_code and sform_code (int16 at 252, 254), quatern_b/c/d and qoffset_x/y/z (float32 at 256..280),
# srow_x/y/z (4 float32 each at 280..328).
_PIXDIM = slice(76, 92)
_XFORM = slice(252, 328)


def is_nifti(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _open(path: pathlib.Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def read_header(path: pathlib.Path) -> tuple[bytes, str] | None:
    """The raw NIfTI-1 header (348 bytes) and its byte order, or None for a NIfTI-2 file or not a NIfTI file."""
    try:
        with _open(path) as f:
            head = f.read(_NIFTI1)
    except (OSError, EOFError, zlib.error) as e:
        raise CaseInputError(f"{path} is damaged or truncated ({_reason(e)}).") from None
    if len(head) < _NIFTI1:
        return None
    for order in "<>":
        if struct.unpack(order + "i", head[:4])[0] == _NIFTI1:
            return head, order
    return None


def check_complete(path: pathlib.Path) -> None:
    """Refuse a NIfTI file that holds fewer bytes than its header announces (or a damaged gzip stream)."""
    total, expected = 0, None
    try:
        with _open(path) as f:
            head = f.read(540)
            total = len(head)
            expected = _expected_size(head)
            for block in iter(lambda: f.read(1 << 22), b""):
                total += len(block)
    except (OSError, EOFError, zlib.error) as e:
        raise CaseInputError(f"{path} is damaged or truncated ({_reason(e)}).") from None
    if expected is not None and total < expected:
        where = "once decompressed, " if path.name.lower().endswith(".gz") else ""
        raise CaseInputError(f"{path} is truncated: {where}it holds {total} bytes, its header announces "
                             f"{expected}.")


def _expected_size(head: bytes) -> int | None:
    """Header + voxel bytes a single-file NIfTI-1 or NIfTI-2 announces; None when it is not one (ITK decides)."""
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0] if len(head) >= 4 else 0
        if size == _NIFTI1 and len(head) >= _NIFTI1 and head[344:347] == b"n+1":
            dim = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
        elif size == 540 and len(head) >= 540 and head[4:7] == b"n+2":
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dim = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
        else:
            continue
        ndim = dim[0]
        if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1:ndim + 1]) or bitpix < 8:
            return None
        return max(offset, size) + int(np.prod(dim[1:ndim + 1], dtype=np.int64)) * (bitpix // 8)
    return None


def transform_choice(head: bytes, order: str, ijk_to_lps_used: np.ndarray) -> str | None:
    """When the qform and the sform are both set and place the voxels differently: which one ITK followed."""
    qform_code, sform_code = struct.unpack(order + "2h", head[252:256])
    if qform_code <= 0 or sform_code <= 0:
        return None
    to_lps = np.diag([-1.0, -1.0, 1.0])  # NIfTI's transforms are RAS
    sform = to_lps @ np.array(struct.unpack(order + "12f", head[280:328]), float).reshape(3, 4)
    qform = to_lps @ _qform(head, order)
    if np.allclose(sform, qform, atol=1e-3):
        return None
    used = np.asarray(ijk_to_lps_used, float)[:3]
    return "sform" if np.allclose(sform, used, atol=1e-3) else "qform" if np.allclose(qform, used, atol=1e-3) \
        else "ITK's reading"


def _qform(head: bytes, order: str) -> np.ndarray:
    """The 3x4 IJK->RAS matrix of a NIfTI-1 qform (quaternion, qfac, pixdim, offset), as the standard defines it."""
    b, c, d = struct.unpack(order + "3f", head[256:268])
    offset = np.array(struct.unpack(order + "3f", head[268:280]), float)
    qfac = -1.0 if struct.unpack(order + "f", head[76:80])[0] < 0 else 1.0
    pixdim = np.array(struct.unpack(order + "3f", head[80:92]), float)
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    return np.c_[rotation * (pixdim * [1.0, 1.0, qfac]), offset]


def copy_transforms(source: tuple[bytes, str], target: pathlib.Path) -> None:
    """Give a NIfTI-1 file we wrote (same byte order, same grid) the source's qform and sform fields."""
    head, order = source
    with _open(target) as f:
        data = bytearray(f.read())
    if struct.unpack(order + "i", bytes(data[:4]))[0] != _NIFTI1:
        return  # written in the other byte order or as NIfTI-2: ITK's single transform stays
    data[_PIXDIM] = head[_PIXDIM]
    data[_XFORM] = head[_XFORM]
    if target.name.lower().endswith(".gz"):
        with gzip.open(target, "wb", compresslevel=6) as f:
            f.write(data)
    else:
        target.write_bytes(bytes(data))


def _reason(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text[:200].rstrip(".")
