"""The one binary format of the protocol, used by the server and the client alike (standard library + numpy).

Volume upload (`VOLUME_MEDIA_TYPE`, `PUT /v1/volumes/<fingerprint>`), little-endian:
    header  magic b"MS2V" | version u16 | dtype code u8 | codec u8 | reserved u16 (0) | shape 3 x u32
            | fingerprint 16 bytes                                                               (38 bytes)
    payload the voxels in C order, little-endian, raw or as one zlib stream (codec 0 raw, 1 zlib)
The fingerprint is blake2b-128 of (dtype code, shape, raw voxel bytes): the volume's identity whatever codec it
is sent with. A volume is only voxels; a session's axis and preprocessing travel in the JSON that opens it. The
client uploads a volume only when the server answers that it lacks the fingerprint; the server recomputes it
while decoding, so a corrupted upload is refused.

Slice mask (responses, mask prompts): height u32 | width u32 | y0 u32 | x0 u32 | h u32 | w u32 | zlib(packbits)
of the mask cropped to its bounding box (h = w = 0 for an empty mask).

Frames (`FRAMES_MEDIA_TYPE`: a prompt's answer, the propagation stream): kind u8 | length u32 | payload.
    START   JSON {"planned": n, "window": slices the server computes beyond the client's acknowledgements}
    SLICE   obj_id u32 | slice_index u32 | object_score f64 | iou f64 | stage u8 | done u32 | planned u32 | mask
    SUMMARY JSON summary; the last frame of a complete stream
    ERROR   JSON {"error": {"code", "message"}}; the last frame of a failed stream
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from typing import BinaryIO, Iterator

import numpy as np

from . import protocol

VOLUME_MEDIA_TYPE = "application/x-medsam2-volume"
FRAMES_MEDIA_TYPE = "application/x-medsam2-frames"
VOLUME_MAGIC = b"MS2V"
VOLUME_VERSION = 2
CODEC_RAW, CODEC_ZLIB = 0, 1
CODECS = {"raw": CODEC_RAW, "zlib": CODEC_ZLIB}
# The voxel types the engine accepts, by wire code (never reorder: the codes are the protocol).
DTYPES = {1: np.uint8, 2: np.int8, 3: np.uint16, 4: np.int16, 5: np.uint32, 6: np.int32, 7: np.float32,
          8: np.float64}
DTYPE_CODES = {np.dtype(t): code for code, t in DTYPES.items()}
MAX_SIDE = 16384  # per axis; the engine applies its own, stricter limits

_VOLUME_HEADER = struct.Struct("<4sHBBH3I16s")
VOLUME_HEADER_SIZE = _VOLUME_HEADER.size
_MASK_HEADER = struct.Struct("<6I")
_FRAME_HEADER = struct.Struct("<BI")
_SLICE = struct.Struct("<IIddBII")
START, SLICE, SUMMARY, ERROR = 1, 2, 3, 4
STAGES = protocol.SLICE_STAGES
_CHUNK = 4 << 20


class WireFormatError(ValueError):
    """Bytes that do not follow this format; the message says what is wrong."""


class VolumeTooLarge(WireFormatError):
    """The declared volume exceeds the receiver's limit."""


# ---- volumes ------------------------------------------------------------------------------------------------------
def wire_array(volume: np.ndarray) -> np.ndarray:
    """The volume as it travels: C-contiguous little-endian (no copy when it already is)."""
    volume = np.asarray(volume)
    dtype = volume.dtype.newbyteorder("<") if volume.dtype.byteorder == ">" else volume.dtype
    if dtype.newbyteorder("=") not in DTYPE_CODES:
        raise WireFormatError(f"Voxel type {volume.dtype} is not supported; use one of "
                              f"{', '.join(np.dtype(t).name for t in DTYPES.values())}.")
    if volume.ndim != 3:
        raise WireFormatError(f"The volume must be 3D; this array has shape {volume.shape}.")
    if volume.size == 0:
        raise WireFormatError(f"The volume is empty (shape {volume.shape}).")
    return np.ascontiguousarray(volume, dtype=dtype)


def _dtype_code(dtype: np.dtype) -> int:
    return DTYPE_CODES[dtype.newbyteorder("=")]


def _identity(code: int, shape) -> bytes:
    return struct.pack("<B3I", code, *shape)


def fingerprint(volume: np.ndarray) -> str:
    """The volume's identity (hex): equal for equal voxel types, shapes and values."""
    a = wire_array(volume)
    h = hashlib.blake2b(_identity(_dtype_code(a.dtype), a.shape), digest_size=16)
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def encode_volume(volume: np.ndarray, codec: str = "raw", fingerprint_hex: str | None = None,
                  progress=None) -> tuple[bytes, Iterator[bytes]]:
    """The upload header and an iterator over the payload chunks (compressed lazily, never all in memory).

    `progress(fraction)` is called as the chunks are taken, with the share of the voxels sent so far (0..1)."""
    a = wire_array(volume)
    if codec not in CODECS:
        raise WireFormatError(f"Unknown codec {codec!r}; use one of {', '.join(CODECS)}.")
    fp = bytes.fromhex(fingerprint_hex or fingerprint(a))
    header = _VOLUME_HEADER.pack(VOLUME_MAGIC, VOLUME_VERSION, _dtype_code(a.dtype), CODECS[codec], 0, *a.shape,
                                 fp)
    raw = memoryview(a).cast("B")

    def chunks() -> Iterator[bytes]:
        z = zlib.compressobj(1) if codec == "zlib" else None
        for i in range(0, len(raw), _CHUNK):
            piece = raw[i : i + _CHUNK]
            out = z.compress(piece) if z else piece
            if out:
                yield out
            if progress is not None:
                progress(min(1.0, (i + len(piece)) / len(raw)))
        if z:
            yield z.flush()

    return header, chunks()


@dataclasses.dataclass
class VolumeHeader:
    version: int
    dtype: np.dtype
    codec: int
    shape: tuple[int, int, int]
    fingerprint: str

    @property
    def raw_nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def parse_volume_header(data: bytes, max_raw_bytes: int) -> VolumeHeader:
    """Check everything the header declares before a single voxel is received or allocated."""
    if len(data) < VOLUME_HEADER_SIZE:
        raise WireFormatError(f"The upload is shorter ({len(data)} bytes) than the {VOLUME_HEADER_SIZE}-byte "
                              f"volume header.")
    magic, version, code, codec, reserved, *rest = _VOLUME_HEADER.unpack_from(data)
    shape, fp = tuple(rest[:3]), rest[3]
    if magic != VOLUME_MAGIC:
        raise WireFormatError("This is not a MedSAM2 volume upload (wrong magic bytes).")
    if version != VOLUME_VERSION:
        raise WireFormatError(f"Volume format version {version} is not supported (this server reads version "
                              f"{VOLUME_VERSION}); update the client or the server so they match.")
    if code not in DTYPES:
        raise WireFormatError(f"Unknown voxel type code {code}.")
    if codec not in CODECS.values():
        known = ", ".join(f"{v} ({k})" for k, v in CODECS.items())
        raise WireFormatError(f"Unknown codec {codec}; this server reads {known}.")
    if reserved != 0:
        raise WireFormatError(f"The volume header's reserved field must be 0, not {reserved}.")
    if min(shape) < 1 or max(shape) > MAX_SIDE:
        raise WireFormatError(f"The volume shape {shape} is empty or has a side over {MAX_SIDE} voxels.")
    header = VolumeHeader(version, np.dtype(DTYPES[code]).newbyteorder("<"), codec, shape, fp.hex())
    if header.raw_nbytes > max_raw_bytes:
        raise VolumeTooLarge(f"The volume {shape} ({header.raw_nbytes / 2**20:.4g} MiB) is larger than this "
                             f"server accepts ({max_raw_bytes / 2**20:.4g} MiB); crop it or raise --max-upload-mb.")
    return header


class VolumeDecoder:
    """Decodes an upload as its bytes arrive: header checked first, voxels written straight into the array.

    `admit(header)`, called after the header is checked and before the array is allocated, may raise to refuse
    the upload (the server reserves the declared size against its memory budget there). The array starts as
    zeros the operating system has not committed yet (calloc), and runs of zero bytes are not written: memory is
    taken as voxel data that is not zero arrives, so a body that inflates zeros to the declared size (a zlib
    bomb) holds its reservation, not the memory, until it is refused. Inflation runs in steps of `_CHUNK`.
    """

    def __init__(self, max_raw_bytes: int, admit=None):
        self.max_raw_bytes = max_raw_bytes
        self.admit = admit
        self.header: VolumeHeader | None = None
        self._pending = b""
        self._array = self._out = self._hash = self._unzip = None
        self._filled = 0

    def feed(self, chunk: bytes) -> None:
        if self.header is None:
            self._pending += chunk
            if len(self._pending) < VOLUME_HEADER_SIZE:
                return
            h = parse_volume_header(self._pending, self.max_raw_bytes)
            if self.admit is not None:
                self.admit(h)
            self.header = h
            self._array = np.zeros(h.shape, h.dtype)
            self._out = memoryview(self._array).cast("B")
            self._hash = hashlib.blake2b(_identity(_dtype_code(h.dtype), h.shape), digest_size=16)
            self._unzip = zlib.decompressobj() if h.codec == CODEC_ZLIB else None
            chunk, self._pending = self._pending[VOLUME_HEADER_SIZE:], b""
        if self._unzip is None:
            self._write(chunk)
            return
        while chunk:
            try:
                voxels = self._unzip.decompress(chunk, min(_CHUNK, len(self._out) - self._filled + 1))
            except zlib.error:
                raise WireFormatError("The compressed volume data is corrupt.") from None
            chunk = self._unzip.unconsumed_tail
            self._write(voxels)
        if self._unzip.unused_data:
            raise WireFormatError("The upload goes on after the end of its compressed voxel data.")

    def _write(self, data: bytes) -> None:
        if len(data) > len(self._out) - self._filled:
            raise WireFormatError(f"The upload holds more voxel data than its header declares "
                                  f"({self.header.shape}, {self.header.dtype.name}).")
        if np.frombuffer(data, np.uint8).any():  # zeros are there already, uncommitted
            self._out[self._filled : self._filled + len(data)] = data
        self._hash.update(data)
        self._filled += len(data)

    def finish(self) -> tuple[np.ndarray, VolumeHeader]:
        """The volume, once all its bytes arrived and its fingerprint matched."""
        if self.header is None:
            parse_volume_header(self._pending, self.max_raw_bytes)  # raises: too short
        if self._unzip is not None and not self._unzip.eof:
            raise WireFormatError("The compressed volume data ends early (truncated upload).")
        if self._filled != len(self._out):
            raise WireFormatError(f"The upload is truncated: {self._filled} of {len(self._out)} voxel bytes "
                                  f"arrived.")
        if self._hash.hexdigest() != self.header.fingerprint:
            raise WireFormatError("The volume does not match its fingerprint: the upload was corrupted. "
                                  "Send it again.")
        return self._array.view(self.header.dtype.newbyteorder("=")), self.header


def decode_volume(data: bytes, max_raw_bytes: int = 1 << 40) -> tuple[np.ndarray, VolumeHeader]:
    decoder = VolumeDecoder(max_raw_bytes)
    decoder.feed(data)
    return decoder.finish()


# ---- masks --------------------------------------------------------------------------------------------------------
def encode_mask(mask: np.ndarray) -> bytes:
    """A bool slice mask, cropped to its bounding box, bit-packed and compressed."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise WireFormatError(f"A slice mask must be 2D, got shape {mask.shape}.")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return _MASK_HEADER.pack(*mask.shape, 0, 0, 0, 0) + zlib.compress(b"", 1)
    y0, x0 = int(rows[0]), int(cols[0])
    crop = mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
    return _MASK_HEADER.pack(*mask.shape, y0, x0, *crop.shape) + zlib.compress(np.packbits(crop).tobytes(), 1)


def mask_shape(data: bytes | memoryview) -> tuple[int, int]:
    """The (height, width) a mask declares, read before anything is allocated for it."""
    if len(data) < _MASK_HEADER.size:
        raise WireFormatError("A slice mask is shorter than its header.")
    return _MASK_HEADER.unpack_from(data)[:2]


def decode_mask(data: bytes | memoryview, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The full-slice bool mask rebuilt from `encode_mask`'s bytes; with `expected_shape`, a mask of another
    shape is refused before it is decoded."""
    declared = mask_shape(data)
    if expected_shape is not None and declared != tuple(expected_shape):
        raise WireFormatError(f"A mask prompt must have the slice's shape {tuple(expected_shape)}, got {declared}.")
    height, width, y0, x0, h, w = _MASK_HEADER.unpack_from(data)
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or y0 + h > height or x0 + w > width:
        raise WireFormatError(f"A slice mask declares an impossible geometry ({height}x{width}, box at "
                              f"({y0}, {x0}) of {h}x{w}).")
    nbytes = (h * w + 7) // 8
    unzip = zlib.decompressobj()
    try:
        bits = unzip.decompress(bytes(data[_MASK_HEADER.size :]), nbytes + 1)
    except zlib.error:
        raise WireFormatError("A slice mask's compressed data is corrupt.") from None
    if len(bits) != nbytes or not unzip.eof:
        raise WireFormatError("A slice mask's data does not match its declared size.")
    mask = np.zeros((height, width), bool)
    if nbytes:
        crop = np.unpackbits(np.frombuffer(bits, np.uint8), count=h * w).reshape(h, w)
        mask[y0 : y0 + h, x0 : x0 + w] = crop.astype(bool)
    return mask


# ---- frames -------------------------------------------------------------------------------------------------------
def frame(kind: int, payload: bytes) -> bytes:
    return _FRAME_HEADER.pack(kind, len(payload)) + payload


def json_frame(kind: int, obj) -> bytes:
    return frame(kind, json.dumps(obj, allow_nan=False).encode())


def slice_frame(obj_id: int, slice_index: int, mask: np.ndarray, object_score: float, iou: float, stage: str,
                done: int, planned: int) -> bytes:
    head = _SLICE.pack(obj_id, slice_index, object_score, iou, STAGES.index(stage), done, planned)
    return frame(SLICE, head + encode_mask(mask))


@dataclasses.dataclass
class SliceFrame:
    obj_id: int
    slice_index: int
    mask: np.ndarray
    object_score: float
    iou: float
    stage: str
    done: int
    planned: int


def parse_slice(payload: bytes) -> SliceFrame:
    if len(payload) < _SLICE.size:
        raise WireFormatError("A slice frame is shorter than its header.")
    obj_id, k, score, iou, stage, done, planned = _SLICE.unpack_from(payload)
    if stage >= len(STAGES):
        raise WireFormatError(f"Unknown slice stage code {stage}.")
    return SliceFrame(obj_id, k, decode_mask(memoryview(payload)[_SLICE.size :]), score, iou, STAGES[stage], done,
                      planned)


def read_frame(stream: BinaryIO, max_payload: int = 1 << 30) -> tuple[int, bytes] | None:
    """The next (kind, payload) of a frame stream, or None at a clean end; a cut inside a frame raises EOFError."""
    head = stream.read(_FRAME_HEADER.size)
    if not head:
        return None
    if len(head) < _FRAME_HEADER.size:
        raise EOFError("the stream ended inside a frame header")
    kind, length = _FRAME_HEADER.unpack(head)
    if kind not in (START, SLICE, SUMMARY, ERROR) or length > max_payload:
        raise WireFormatError(f"Unknown frame kind {kind} or size {length}.")
    payload = stream.read(length) if length else b""
    if len(payload) < length:
        raise EOFError("the stream ended inside a frame")
    return kind, payload
