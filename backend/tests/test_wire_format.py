"""The binary format: volumes, masks and frames survive the trip exactly, and bad bytes are refused clearly."""

import io
import struct
import zlib

import numpy as np
import pytest

from medsam2_client import wire


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float32,
                                   np.float64])
@pytest.mark.parametrize("codec", ["raw", "zlib"])
def test_volume_round_trip_every_dtype_and_codec(dtype, codec):
    vol = (np.random.default_rng(1).normal(0, 50, (3, 5, 7)) + 60).astype(dtype)
    header, chunks = wire.encode_volume(vol, codec)
    out, h = wire.decode_volume(header + b"".join(chunks))
    assert out.dtype == vol.dtype and out.shape == vol.shape and np.array_equal(out, vol)
    assert h.fingerprint == wire.fingerprint(vol) and h.shape == vol.shape


def test_fingerprint_is_the_volume_identity():
    vol = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    assert wire.fingerprint(vol) == wire.fingerprint(vol.astype(">i2"))  # byte order is not identity
    assert wire.fingerprint(vol) == wire.fingerprint(np.asfortranarray(vol))
    assert wire.fingerprint(vol) != wire.fingerprint(vol.reshape(3, 5, 4))
    assert wire.fingerprint(vol) != wire.fingerprint(vol.astype(np.int32))
    changed = vol.copy()
    changed[2, 3, 4] += 1
    assert wire.fingerprint(vol) != wire.fingerprint(changed)


def test_big_endian_and_strided_inputs_arrive_as_values():
    vol = np.arange(2 * 3 * 4, dtype=">f4").reshape(2, 3, 4)[:, ::-1]
    header, chunks = wire.encode_volume(vol, codec="zlib")
    out, _ = wire.decode_volume(header + b"".join(chunks))
    assert np.array_equal(out, vol) and out.dtype.isnative


def _upload(vol=None, codec="raw"):
    vol = np.ones((2, 3, 4), np.int16) if vol is None else vol
    header, chunks = wire.encode_volume(vol, codec=codec)
    return header, b"".join(chunks)


@pytest.mark.parametrize("mutate, message", [
    (lambda h, b: (b"XXXX" + h[4:], b), "magic"),
    (lambda h, b: (h[:4] + struct.pack("<H", 9) + h[6:], b), "version 9"),
    (lambda h, b: (h[:6] + bytes([99]) + h[7:], b), "voxel type code 99"),
    (lambda h, b: (h[:7] + bytes([3]) + h[8:], b), "Unknown codec 3; this server reads 0 .raw., 1 .zlib."),
    (lambda h, b: (h[:8] + struct.pack("<H", 5) + h[10:], b), "reserved field must be 0, not 5"),
    (lambda h, b: (h[:10] + struct.pack("<3I", 0, 3, 4) + h[22:], b), "empty"),
    (lambda h, b: (h[:20], b""), "shorter"),
    (lambda h, b: (h, b[:-1]), "truncated"),
    (lambda h, b: (h, b + b"\0"), "more voxel data"),
    (lambda h, b: (h, b[:-1] + bytes([b[-1] ^ 1])), "fingerprint"),
])
def test_malformed_uploads_are_refused_with_a_reason(mutate, message):
    header, body = mutate(*_upload())
    with pytest.raises(wire.WireFormatError, match=message):
        wire.decode_volume(header + body)


def test_declared_size_is_checked_before_anything_is_allocated():
    header = bytearray(_upload()[0])
    header[10:22] = struct.pack("<3I", 16000, 16000, 16000)
    decoder = wire.VolumeDecoder(max_raw_bytes=1 << 30)
    with pytest.raises(wire.VolumeTooLarge, match="larger than"):
        decoder.feed(bytes(header))


def test_corrupt_and_truncated_zlib_payloads():
    header, body = _upload(np.arange(1000, dtype=np.int32).reshape(10, 10, 10), "zlib")
    with pytest.raises(wire.WireFormatError, match="ends early"):
        wire.decode_volume(header + body[: len(body) // 2])
    with pytest.raises(wire.WireFormatError, match="corrupt"):
        wire.decode_volume(header + b"\xff" * len(body))


def test_zlib_bomb_cannot_exceed_the_declared_size():
    header, _ = _upload(np.zeros((2, 3, 4), np.int16), "zlib")
    with pytest.raises(wire.WireFormatError, match="more voxel data"):
        wire.decode_volume(header + zlib.compress(bytes(10_000_000)))


def test_data_after_the_compressed_voxels_is_refused():
    header, body = _upload(np.arange(24, dtype=np.int16).reshape(2, 3, 4), "zlib")
    with pytest.raises(wire.WireFormatError, match="goes on after the end"):
        wire.decode_volume(header + body + b"\0")


@pytest.mark.parametrize("codec", ["raw", "zlib"])
def test_runs_of_zeros_arrive_as_zeros_fed_in_any_pieces(codec):
    """Zero bytes are not written (the array starts zeroed): what arrives is still every voxel, in place."""
    vol = np.zeros((40, 256, 256), np.int16)  # 5 MiB: more than one inflation step
    vol[3, 5, 7], vol[17] = -1, 300
    vol[39, 255, 255] = 12
    header, body = _upload(vol, codec)
    data = header + body
    for piece in (1000, 4093, 1 << 20):
        decoder = wire.VolumeDecoder(1 << 30)
        for i in range(0, len(data), piece):
            decoder.feed(data[i : i + piece])
        got, _ = decoder.finish()
        np.testing.assert_array_equal(got, vol)


def test_mask_is_cropped_to_its_bounding_box():
    mask = np.zeros((300, 400), bool)
    mask[100:120, 250:261] = True
    mask[110, 255] = False
    data = wire.encode_mask(mask)
    assert struct.unpack_from("<6I", data) == (300, 400, 100, 250, 20, 11)
    assert len(data) < 80  # a crop of 220 bits, compressed; the full slice would be 15000 bytes packed
    assert np.array_equal(wire.decode_mask(data), mask)


@pytest.mark.parametrize("mask", [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.eye(9, 4, dtype=bool)])
def test_mask_round_trip_edge_cases(mask):
    assert np.array_equal(wire.decode_mask(wire.encode_mask(mask)), mask)


def test_mask_with_impossible_geometry_is_refused():
    data = bytearray(wire.encode_mask(np.ones((4, 4), bool)))
    data[16:20] = struct.pack("<I", 9)  # crop height beyond the slice
    with pytest.raises(wire.WireFormatError, match="impossible geometry"):
        wire.decode_mask(bytes(data))


def test_frames_stream_and_truncation():
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:7] = True
    stream = (wire.json_frame(wire.START, {"planned": 2})
              + wire.slice_frame(3, 4, mask, -float("inf"), 0.25, "cleared", 1, 2)
              + wire.json_frame(wire.SUMMARY, {"ok": 1}))
    f = io.BytesIO(stream)
    assert wire.read_frame(f) == (wire.START, b'{"planned": 2}')
    kind, payload = wire.read_frame(f)
    s = wire.parse_slice(payload)
    assert (kind, s.obj_id, s.slice_index, s.object_score, s.iou, s.stage, s.done, s.planned) == (
        wire.SLICE, 3, 4, -float("inf"), 0.25, "cleared", 1, 2)
    assert np.array_equal(s.mask, mask)
    assert wire.read_frame(f)[0] == wire.SUMMARY and wire.read_frame(f) is None
    cut = io.BytesIO(stream[:-3])
    with pytest.raises(EOFError):
        while wire.read_frame(cut) is not None:
            pass


def test_loopback_is_this_computer_only():
    from medsam2_client.protocol import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "gpu-host.example.org", ""]))


def test_the_protocol_names_what_the_engine_accepts():
    from medsam2_backend import engine
    from medsam2_client import protocol

    assert protocol.DIRECTIONS == engine.DIRECTIONS
    assert protocol.POSTPROCESS_STEPS == engine.POSTPROCESS_STEPS
