"""The app in process (FastAPI TestClient): auth, the error contract and a corpus of bad input.

Each bad request must get its stable code and a message a user can act on, and a good request right after it
must still succeed: the server never falls over on input.
"""

import base64
import io
import json
import struct
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from medsam2_backend.engine import DiskEngine, EngineInputError, Preprocessing
from medsam2_backend.server import make_app
from medsam2_client import protocol, wire
from server_helpers import box_mask, random_volume

TOKEN = "correct horse battery staple"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHAPE = (8, 30, 40)


def local(app) -> TestClient:
    """A test client that talks to the app as a loopback client does (Host 127.0.0.1)."""
    return TestClient(app, base_url="http://127.0.0.1")


def upload_body(vol, codec="raw") -> bytes:
    header, chunks = wire.encode_volume(vol, codec)
    return header + b"".join(chunks)


def upload(http, vol, body: bytes | None = None, headers=AUTH):
    return http.put(protocol.VOLUME.format(fingerprint=wire.fingerprint(vol)),
                    content=upload_body(vol) if body is None else body,
                    headers={**headers, "Content-Type": wire.VOLUME_MEDIA_TYPE})


def open_session(http, vol, **kw) -> str:
    assert upload(http, vol).status_code == 201
    r = http.post(protocol.SESSIONS, json={"fingerprint": wire.fingerprint(vol), **kw}, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def prompt(http, sid, **body):
    return http.post(protocol.PROMPTS.format(session_id=sid), json=body, headers=AUTH)


def slice_of(response) -> wire.SliceFrame:
    kind, payload = wire.read_frame(io.BytesIO(response.content))
    assert kind == wire.SLICE
    return wire.parse_slice(payload)


@pytest.fixture
def http():
    with local(make_app(DiskEngine(radius=4, shrink=1), token=TOKEN, max_upload_bytes=1 << 20,
                             memory_budget_bytes=64 << 20)) as client:
        yield client


@pytest.fixture
def sid(http):
    return open_session(http, random_volume(SHAPE))


def assert_good_request_works(http, sid):
    r = prompt(http, sid, obj_id=1, slice_index=2, box=[5, 6, 15, 20])
    assert r.status_code == 200, r.text
    assert np.array_equal(slice_of(r).mask, box_mask(SHAPE[1:], (5, 6, 15, 20)))


def assert_error(r, status, code, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert all(w.lower() in err["message"].lower() for w in words), err["message"]


def test_health_needs_no_token_but_everything_else_does(http):
    assert http.get(protocol.HEALTH).json() == {"status": "ok", "protocol_version": protocol.PROTOCOL_VERSION,
                                                 "server_version": "0.1.0"}
    assert_error(http.get(protocol.CAPABILITIES), 401, "unauthorized", "token")
    assert_error(http.get(protocol.CAPABILITIES, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert_error(http.get(protocol.CAPABILITIES, headers={"Authorization": TOKEN}), 401, "unauthorized")
    assert_error(upload(http, random_volume(SHAPE), headers={}), 401, "unauthorized")
    caps = http.get(protocol.CAPABILITIES, headers=AUTH).json()
    assert caps["protocol_version"] == protocol.PROTOCOL_VERSION
    assert caps["engine"]["engine"] == "disk-test-engine" and caps["engine"]["checkpoint"] == "none"
    assert caps["limits"]["max_upload_bytes"] == 1 << 20
    assert caps["prompt_types"] == ["points", "box", "mask"] and "warning" not in caps
    for path in ("/docs", "/redoc", "/openapi.json"):  # off by default
        assert_error(http.get(path, headers=AUTH), 404, "not_found")


def test_docs_when_asked_for_are_behind_the_token():
    with local(make_app(DiskEngine(), token=TOKEN, docs=True)) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_error(http.get(path), 401, "unauthorized")
            assert http.get(path, headers=AUTH).status_code == 200
        assert "/v1/sessions/{session_id}/propagate" in http.get("/openapi.json", headers=AUTH).json()["paths"]


def test_protocol_version_mismatch_is_named(http):
    r = http.get(protocol.CAPABILITIES, headers={**AUTH, protocol.PROTOCOL_HEADER: "99"})
    assert_error(r, 400, "bad_request", "protocol 99", "update")


def test_an_older_client_is_told_what_to_update(http):
    r = http.get(protocol.CAPABILITIES, headers={**AUTH, protocol.PROTOCOL_HEADER: "1"})
    assert_error(r, 400, "bad_request", "protocol 1", "update the MedSAM2 extension")


WRONG_TYPES = [{"a": 1}, ["x"], "text", True, 1.5, [[[[1]]]]]


def _json_routes(sid, fp):
    """Every route that takes JSON: (method, path, a valid body, the fields to spoil (dotted: nested))."""
    pre = ["preset", "level", "width", "percentiles", "resize"]
    return [
        ("POST", protocol.SESSIONS, {"fingerprint": fp, "preprocessing": {}},
         ["fingerprint", "spacing", "axis", "preprocessing"] + [f"preprocessing.{f}" for f in pre]),
        ("POST", protocol.PROMPTS.format(session_id=sid), {"obj_id": 1, "slice_index": 2, "box": [5, 6, 15, 20]},
         ["obj_id", "slice_index", "points", "labels", "box", "mask", "replace"]),
        ("POST", protocol.PROPAGATE.format(session_id=sid), {"obj_ids": [1]},
         ["obj_ids", "direction", "start", "stop", "stop_after_empty", "postprocess"]),
        ("PUT", protocol.PREPROCESSING.format(session_id=sid), {}, pre),
        ("POST", protocol.ACKNOWLEDGE.format(session_id=sid), {"received": 1}, ["received"]),
    ]


def test_every_json_field_of_every_route_refuses_wrong_types_with_a_sentence(http, sid):
    assert_good_request_works(http, sid)
    fp = wire.fingerprint(random_volume(SHAPE))
    for method, path, valid, fields in _json_routes(sid, fp):
        for field in fields:
            for wrong in WRONG_TYPES:
                if field == "replace" and wrong is True:
                    continue  # the one value in the list of the right type
                body = json.loads(json.dumps(valid))
                *outer, name = field.split(".")
                (body[outer[0]] if outer else body)[name] = wrong
                r = http.request(method, path, json=body, headers=AUTH)
                assert 400 <= r.status_code < 500, (method, path, field, wrong, r.text)
                message = r.json()["error"]["message"]
                assert message.endswith(".") and "Traceback" not in message, message
        deep = "[" * 3000 + "]" * 3000
        for raw in (deep, '{"%s": %s}' % (fields[0].split(".")[0], deep)):
            r = http.request(method, path, content=raw, headers={**AUTH, "Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (method, path, r.text)
    assert_good_request_works(http, sid)


def test_a_nan_window_level_is_named_as_the_level(http, sid):
    r = http.put(protocol.PREPROCESSING.format(session_id=sid), content=b'{"level": NaN, "width": 400}',
                 headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 400, "bad_request", "level", "finite")
    with pytest.raises(EngineInputError, match="window level must be a finite number"):
        Preprocessing(level=float("nan"), width=400)


def test_session_lifecycle_and_fingerprint_reuse(http, sid):
    vol = random_volume(SHAPE)
    fp = wire.fingerprint(vol)
    r = http.post(protocol.SESSIONS, json={"fingerprint": fp, "axis": 2, "spacing": [1, 1, 3]}, headers=AUTH)
    assert r.status_code == 201 and r.json()["slice_shape"] == [8, 30] and r.json()["num_slices"] == 40
    r = http.post(protocol.SESSIONS, json={"fingerprint": "0" * 32}, headers=AUTH)
    assert_error(r, 404, "not_found", "upload")
    assert http.delete(protocol.SESSION.format(session_id=sid), headers=AUTH).json() == {"closed": True}
    assert_error(prompt(http, sid, obj_id=1, slice_index=2, box=[5, 6, 15, 20]), 410, "session_expired",
                 "closed", "open it again")
    # The closed session's volume stays available by fingerprint.
    assert http.post(protocol.SESSIONS, json={"fingerprint": fp}, headers=AUTH).status_code == 201


def test_propagation_through_test_client(http, sid):
    assert prompt(http, sid, obj_id=3, slice_index=4, box=[10, 5, 30, 25]).status_code == 200
    r = http.post(protocol.PROPAGATE.format(session_id=sid), json={"start": 2, "stop": 6}, headers=AUTH)
    f = io.BytesIO(r.content)
    frames = []
    while (item := wire.read_frame(f)) is not None:
        frames.append(item)
    assert frames[0] == (wire.START, b'{"planned": 5, "window": 32}')
    slices = {s.slice_index: s for s in (wire.parse_slice(p) for k, p in frames if k == wire.SLICE)}
    assert sorted(slices) == [2, 3, 4, 5, 6]
    for k, s in slices.items():
        assert np.array_equal(s.mask, box_mask(SHAPE[1:], (10, 5, 30, 25), abs(k - 4))), k
    summary = json.loads(frames[-1][1])
    assert frames[-1][0] == wire.SUMMARY and summary["slices_done"] == 5 and not summary["cancelled"]
    assert sorted(map(tuple, summary["least_certain"]["3"][:2])) == [(2, pytest.approx(0.98)), (6, pytest.approx(0.98))]


def _corrupt_fingerprint(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 1])


BAD_UPLOADS = [
    ("not a volume", lambda b: b"GIF89a" + b[6:], 400, "bad_request", "magic"),
    ("truncated header", lambda b: b[:30], 400, "bad_request", "header"),
    ("truncated body", lambda b: b[:-100], 400, "bad_request", "truncated"),
    ("dtype code", lambda b: b[:6] + bytes([42]) + b[7:], 400, "bad_request", "voxel type"),
    ("huge dims", lambda b: b[:10] + struct.pack("<3I", 16000, 16000, 16000) + b[22:], 413, "too_large", "MiB"),
    ("side too long", lambda b: b[:10] + struct.pack("<3I", 1, 1, 99999) + b[22:], 400, "bad_request", "side"),
    ("corrupted", _corrupt_fingerprint, 400, "bad_request", "fingerprint"),
    ("oversize", lambda b: b + bytes(2 << 20), 413, "too_large", "max-upload-mb"),
]


@pytest.mark.parametrize("name, mutate, status, code, word", BAD_UPLOADS, ids=[u[0] for u in BAD_UPLOADS])
def test_bad_uploads(http, sid, name, mutate, status, code, word):
    vol = random_volume(SHAPE, seed=5)
    assert_error(upload(http, vol, mutate(upload_body(vol))), status, code, word)
    assert http.app.state.manager.stats()["reserved_bytes"] == 0
    assert_good_request_works(http, sid)


def test_nan_volume_and_wrong_content_type(http, sid):
    vol = np.zeros(SHAPE, np.float32)
    vol[3, 4, 5] = np.nan
    assert_error(upload(http, vol), 400, "bad_request", "NaN")
    r = http.put(protocol.VOLUME.format(fingerprint="0" * 32), content=b"hello",
                 headers={**AUTH, "Content-Type": "text/plain"})
    assert_error(r, 400, "bad_request", wire.VOLUME_MEDIA_TYPE)
    r = http.post(protocol.SESSIONS, content=b"hello", headers={**AUTH, "Content-Type": "text/plain"})
    assert_error(r, 400, "bad_request", "JSON")
    r = http.put(protocol.VOLUME.format(fingerprint="0" * 32), content=upload_body(vol),
                 headers={**AUTH, "Content-Type": wire.VOLUME_MEDIA_TYPE})
    assert_error(r, 400, "bad_request", "fingerprint")
    r = http.post(protocol.SESSIONS, content=b"{nope", headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 400, "bad_request", "JSON")
    assert_good_request_works(http, sid)


BAD_PROMPTS = [
    ({"obj_id": 1, "slice_index": 99, "box": [1, 1, 5, 5]}, "outside the volume"),
    ({"obj_id": 1, "slice_index": -1, "box": [1, 1, 5, 5]}, "outside the volume"),
    ({"obj_id": 1, "slice_index": 2, "box": [20, 1, 5, 5]}, "reversed"),
    ({"obj_id": 1, "slice_index": 2, "box": [1, 1, 500, 5]}, "outside the slice"),
    ({"obj_id": 1, "slice_index": 2, "points": [[50, 5]], "labels": [1]}, "outside the slice"),
    ({"obj_id": 1, "slice_index": 2, "points": [[5, 5]], "labels": [7]}, "label"),
    ({"obj_id": 1, "slice_index": 2, "points": [[5, 5]]}, "labels go together"),
    ({"obj_id": -4, "slice_index": 2, "box": [1, 1, 5, 5]}, "object id"),
    ({"obj_id": "one", "slice_index": 2, "box": [1, 1, 5, 5]}, "obj_id"),
    ({"obj_id": 1, "slice_index": 2.5, "box": [1, 1, 5, 5]}, "slice_index"),
    ({"obj_id": 1, "slice_index": 2}, "needs points, a box or a mask"),
    ({"obj_id": 1, "slice_index": 2, "box": [1, 1, 5, 5], "colour": "red"}, "colour"),
    ({"obj_id": 1, "slice_index": 2, "mask": "%%%"}, "base64"),
    ({"obj_id": 1, "slice_index": 2, "mask": base64.b64encode(wire.encode_mask(np.ones((3, 3), bool))).decode()},
     "shape"),
]


@pytest.mark.parametrize("body, words", BAD_PROMPTS)
def test_bad_prompts(http, sid, body, words):
    assert_error(prompt(http, sid, **body), 400, "bad_request", words)
    assert_good_request_works(http, sid)


def test_nan_point_and_bad_json(http, sid):
    r = http.post(protocol.PROMPTS.format(session_id=sid), headers={**AUTH, "Content-Type": "application/json"},
                  content=b'{"obj_id": 1, "slice_index": 2, "points": [[NaN, 3]], "labels": [1]}')
    assert_error(r, 400, "bad_request", "points", "finite number")
    r = http.post(protocol.PROMPTS.format(session_id=sid), headers={**AUTH, "Content-Type": "application/json"},
                  content=b'{"obj_id": 1,')
    assert_error(r, 400, "bad_request")
    assert_good_request_works(http, sid)


def test_mask_prompt_round_trip(http, sid):
    m = np.zeros(SHAPE[1:], bool)
    m[3:9, 30:37] = True
    r = prompt(http, sid, obj_id=2, slice_index=0, mask=base64.b64encode(wire.encode_mask(m)).decode())
    assert r.status_code == 200 and np.array_equal(slice_of(r).mask, m)


@pytest.mark.parametrize("body, words", [
    ({"start": 5, "stop": 2}, "empty"),
    ({"direction": "sideways"}, "direction"),
    ({"obj_ids": [77]}, "no prompt"),
    ({"stop_after_empty": 0}, "at least 1"),
    ({"postprocess": ["smooth"]}, "post-processing"),
    ({"stop": 8}, "outside the volume"),
])
def test_bad_propagation_requests(http, sid, body, words):
    assert prompt(http, sid, obj_id=1, slice_index=2, box=[5, 6, 15, 20]).status_code == 200
    r = http.post(protocol.PROPAGATE.format(session_id=sid), json=body, headers=AUTH)
    assert_error(r, 400, "bad_request", words)
    r = http.post(protocol.PROPAGATE.format(session_id=sid), json={}, headers=AUTH)  # the session is free again
    assert r.status_code == 200 and r.content.endswith(b"}")


def test_unknown_session_route_and_preprocessing(http, sid):
    assert_error(prompt(http, "no-such-session", obj_id=1, slice_index=2, box=[1, 1, 5, 5]), 410,
                 "session_expired", "restarted")
    assert_error(http.get("/v1/nothing-here", headers=AUTH), 404, "not_found")
    url = protocol.PREPROCESSING.format(session_id=sid)
    assert_error(http.put(url, json={"preset": "kidney"}, headers=AUTH), 400, "bad_request", "preset")
    assert_error(http.put(url, json={"level": "high", "width": 3}, headers=AUTH), 400, "bad_request", "level", "number")
    assert_error(http.put(url, json={"gamma": 2}, headers=AUTH), 400, "bad_request", "gamma", "not permitted")
    assert http.put(url, json={"preset": "lung"}, headers=AUTH).json() == {"ok": True}
    assert_good_request_works(http, sid)
    r = http.delete(protocol.OBJECT.format(session_id=sid, obj_id=1), headers=AUTH)
    assert r.json() == {"ok": True}
    r = http.post(protocol.PROPAGATE.format(session_id=sid), json={}, headers=AUTH)
    assert_error(r, 400, "bad_request", "Nothing to propagate")


def test_idle_sessions_expire_in_the_background():
    with local(make_app(DiskEngine(), idle_timeout_s=0.3, reaper_period_s=0.1)) as http:
        sid = open_session(http, random_volume(SHAPE))
        opened = time.monotonic()
        while http.app.state.manager.stats()["sessions"] and time.monotonic() - opened < 3:
            time.sleep(0.02)  # no request arrives meanwhile: the reaper alone frees the session
        assert http.app.state.manager.stats()["sessions"] == 0
        assert time.monotonic() - opened < 0.3 + 0.1 + 1.0  # its timeout plus the reaper's period (and slack)
        r = http.post(protocol.PROMPTS.format(session_id=sid), json={"obj_id": 1, "slice_index": 0,
                                                                     "box": [1, 1, 5, 5]})
        assert_error(r, 410, "session_expired", "idle")


def test_too_many_sessions_evicts_the_least_recently_used():
    with local(make_app(DiskEngine(), max_sessions=2, eviction_grace_s=0)) as http:
        ids = [open_session(http, random_volume(SHAPE, seed=i)) for i in range(3)]
        assert http.app.state.manager.stats()["sessions"] == 2
        r = http.post(protocol.PROMPTS.format(session_id=ids[0]), json={"obj_id": 1, "slice_index": 0,
                                                                         "box": [1, 1, 5, 5]})
        assert_error(r, 410, "session_expired", "evicted")
        r = http.post(protocol.PROMPTS.format(session_id=ids[2]), json={"obj_id": 1, "slice_index": 0,
                                                                         "box": [1, 1, 5, 5]})
        assert r.status_code == 200


def test_a_volume_over_the_memory_budget_is_refused():
    with local(make_app(DiskEngine(), memory_budget_bytes=10_000)) as http:
        assert_error(upload(http, random_volume(SHAPE), headers={}), 413, "too_large", "memory budget")
