"""The torch-free client against real servers (uvicorn in a thread): exact masks, concurrency, eviction, cancel."""

import http.server
import json
import threading
import time

import numpy as np
import pytest

from medsam2_backend.engine import DiskEngine
from medsam2_client import MedSAM2Client, errors, protocol
from server_helpers import SlowDiskEngine, box_mask, random_volume, thread_server


@pytest.fixture(scope="module")
def server():
    with thread_server(DiskEngine(radius=5, shrink=1), token="t0ken", eviction_grace_s=0.5) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    return MedSAM2Client(server[0], token="t0ken", timeout=10)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_masks_through_the_wire_follow_the_axis(client, axis):
    vol = random_volume((12, 40, 50))
    s = client.open_session(vol, spacing=(2.0, 0.8, 0.8), axis=axis)
    slice_shape = tuple(n for i, n in enumerate(vol.shape) if i != axis)
    assert (s.num_slices, s.slice_shape) == (vol.shape[axis], slice_shape)
    box = (2, 3, 9, 10)  # x0, y0, x1, y1: columns 2..9, rows 3..10 of the slice
    r = s.add_prompt(4, 5, box=box)
    assert (r.obj_id, r.slice_index, r.stage, r.object_score, r.iou) == (4, 5, "prompt", 5.0, 1.0)
    assert r.mask.shape == slice_shape and np.array_equal(r.mask, box_mask(slice_shape, box))
    run = s.propagate(start=2, stop=9)
    assert run.planned == 8
    got = {m.slice_index: m for m in run}
    assert sorted(got) == list(range(2, 10))
    for k, m in got.items():
        assert np.array_equal(m.mask, box_mask(slice_shape, box, abs(k - 5))), k  # 1 px per slice per side
        assert m.iou == pytest.approx(1 - 0.01 * abs(k - 5)) and m.stage == "propagate"
    assert run.summary.slices_done == 8 and run.summary.cancelled is False
    least = run.summary.least_certain[4]
    assert least[0] == (9, pytest.approx(0.96)) and {k for k, _ in least[1:3]} == {2, 8}  # farthest: least certain
    s.close()


def test_repeat_open_skips_the_upload_and_points_work(client):
    vol = random_volume((6, 32, 32), seed=3)
    a = client.open_session(vol)
    b = client.open_session(vol.copy(), spacing=(3, 1, 1))
    assert (a.uploads, b.uploads) == (1, 0) and a.session_id != b.session_id
    known = client.open_session(vol, axis=1, fingerprint=a.fingerprint)  # a caller that kept the fingerprint
    assert known.uploads == 0 and known.fingerprint == a.fingerprint and known.slice_shape == (6, 32)
    r = b.add_prompt(0, 3, points=np.array([[10, 12], [20, 12]]), labels=np.array([1, 0]))
    rows, cols = np.ogrid[:32, :32]
    expected = ((cols - 10) ** 2 + (rows - 12) ** 2 <= 25) & ~((cols - 20) ** 2 + (rows - 12) ** 2 <= 25)
    assert np.array_equal(r.mask, expected)
    b.reset_object(0)
    with pytest.raises(errors.BadRequest, match="Nothing to propagate"):
        b.propagate()
    with pytest.raises(errors.BadRequest, match="outside the volume"):
        a.add_prompt(1, 6, box=(1, 1, 4, 4))


def test_wrong_or_missing_token(server):
    vol = random_volume((4, 16, 16))
    for token in (None, "wrong"):
        c = MedSAM2Client(server[0], token=token)
        assert c.health()["status"] == "ok"
        with pytest.raises(errors.Unauthorized, match="token"):
            c.open_session(vol)


def test_nothing_listening_is_a_typed_error():
    from server_helpers import free_port

    c = MedSAM2Client(f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(errors.ConnectionRefused, match="No MedSAM2 server answers"):
        c.capabilities()
    assert time.monotonic() - t0 < 2


def _segment(client, seed):
    shape = (10 + seed % 3, 36 + seed, 44)
    vol = random_volume(shape, seed=seed)
    s = client.open_session(vol, axis=seed % 3)
    h, w = s.slice_shape
    box = (3, 2, min(w - 2, 20 + seed), min(h - 2, 25))
    first = s.add_prompt(1, 4, box=box)
    masks = {m.slice_index: m.mask for m in s.propagate()}
    masks[4] = masks.get(4, first.mask)
    return vol, seed % 3, box, masks, s


def _reference(vol, axis, box):
    ref = DiskEngine(radius=5, shrink=1).open_session(vol, axis=axis)
    ref.add_prompt(1, 4, box=box)
    list(ref.propagate())
    return ref.object_mask(1)


def test_eight_clients_at_once_get_their_own_results(server):
    results, failures = {}, []

    def work(seed):
        try:
            results[seed] = _segment(MedSAM2Client(server[0], token="t0ken", timeout=30), seed)
        except Exception as e:  # reported below
            failures.append((seed, e))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    for seed, (vol, axis, box, masks, session) in results.items():
        expected = np.moveaxis(_reference(vol, axis, box), axis, 0)
        got = np.stack([masks[k] for k in range(vol.shape[axis])])
        assert np.array_equal(got, expected), seed
        assert expected.sum() > 0
        session.close()


def test_memory_eviction_is_handled_by_a_transparent_reopen():
    vol_bytes = 8 * 64 * 64 * 2
    # Room for two volumes with one object each, not for three.
    with thread_server(DiskEngine(radius=5, shrink=1), memory_budget_bytes=int(2.5 * vol_bytes * 1.5),
                       eviction_grace_s=0) as (url, app):
        c = MedSAM2Client(url)
        sessions = [c.open_session(random_volume((8, 64, 64), seed=i)) for i in range(3)]
        sessions[0].add_prompt(2, 3, box=(10, 10, 30, 30))
        sessions[1].add_prompt(2, 3, box=(10, 10, 30, 30))
        sessions[2].add_prompt(2, 3, box=(10, 10, 30, 30))
        assert app.state.manager.evictions >= 1
        s = sessions[0]
        run = s.propagate()
        masks = {m.slice_index: m.mask for m in run}
        assert s.reopened == 1 and s.uploads == 2
        for k in range(8):
            if k != 3:
                assert np.array_equal(masks[k], box_mask((64, 64), (10, 10, 30, 30), abs(k - 3))), k
        assert app.state.manager.memory_bytes() <= app.state.manager.memory_budget_bytes


def test_cancel_and_disconnect_stop_the_engine_within_a_slice():
    engine = SlowDiskEngine(0.05, radius=5, shrink=0)
    with thread_server(engine) as (url, _):
        c = MedSAM2Client(url, timeout=10)
        s = c.open_session(random_volume((60, 32, 32)))
        s.add_prompt(1, 0, box=(5, 5, 20, 20))
        run = s.propagate()
        assert run.planned == 60
        seen = []
        for m in run:
            seen.append(m.slice_index)
            if len(seen) == 3:
                run.cancel()
        assert run.summary.cancelled is True and run.summary.slices_done < 20
        assert len(seen) == 3
        # The session is free again at once: a prompt does not wait for the rest of the run (counted in slices
        # the engine tracked meanwhile, not in wall-clock time: at most the one that was in flight).
        tracked = engine.tracked
        s.add_prompt(1, 0, box=(5, 5, 20, 20))
        assert engine.tracked - tracked <= 1

        engine.tracked = 0
        run = s.propagate()
        next(iter(run))
        run.close()  # the client goes away without a word
        deadline = time.monotonic() + 10
        while True:  # the event: the server stops the run and frees the session
            try:
                s.add_prompt(1, 10, box=(5, 5, 20, 20))  # and the session is usable
                break
            except errors.Busy:
                assert time.monotonic() < deadline, "the server never stopped the abandoned propagation"
        stopped_at = engine.tracked
        s.add_prompt(1, 11, box=(5, 5, 20, 20))
        assert engine.tracked == stopped_at and stopped_at < 30


def test_a_busy_session_answers_busy_instead_of_hanging():
    engine = SlowDiskEngine(0.2, radius=5, shrink=0)
    with thread_server(engine, busy_wait_s=0.3) as (url, _):
        s = MedSAM2Client(url).open_session(random_volume((30, 16, 16)))
        s.add_prompt(1, 0, box=(2, 2, 9, 9))
        run = s.propagate()
        with pytest.raises(errors.Busy, match="busy"):
            s.add_prompt(1, 3, box=(2, 2, 9, 9))
        run.cancel()
        assert list(run) == [] and run.summary.cancelled


def test_a_waiting_propagation_never_blocks_the_server():
    """While one session's slice holds the engine's lock, other requests (health, a second propagation) go on."""
    engine = SlowDiskEngine(delay=0.4, radius=5, shrink=1)
    with thread_server(engine) as (url, _):
        c = MedSAM2Client(url, timeout=20)
        sessions = [c.open_session(random_volume((6, 24, 24), seed=k)) for k in range(2)]
        for s in sessions:
            s.add_prompt(1, 0, box=(2, 2, 20, 20))
        results = {}
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, list(sessions[k].propagate())))
                   for k in range(2)]
        for t in threads:
            t.start()
        answered = 0
        while any(t.is_alive() for t in threads):
            with engine.lock:  # no slice can progress now, and both propagations wait for it: health answers
                MedSAM2Client(url, timeout=5).health()
                answered += 1
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert [len(results[k]) for k in range(2)] == [6, 6] and answered > 0


def test_an_empty_volume_is_a_sentence_not_a_type_error(client):
    with pytest.raises(errors.BadRequest, match="empty"):
        client.open_session(np.zeros((0, 4, 4), np.int16))


def test_upload_progress_is_reported_and_only_for_an_upload(client):
    vol = random_volume((16, 256, 512), seed=42)  # 4 MiB: one progress step per 4 MiB chunk, at least one
    seen = []
    client.open_session(vol, upload_progress=seen.append)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    again = []
    assert client.open_session(vol, upload_progress=again.append).uploads == 0 and again == []


def test_a_stream_longer_than_the_idle_body_deadline_is_not_cut():
    """The idle-body deadline bounds a request body; a propagation streams for as long as it computes (here 12
    slices at 0.1 s against a 0.3 s deadline: on the old gate the stream broke off with IncompleteRead)."""
    engine = SlowDiskEngine(0.1, radius=5, shrink=0)
    with thread_server(engine, body_idle_s=0.3) as (url, _):
        s = MedSAM2Client(url, timeout=20).open_session(random_volume((12, 16, 16)))
        s.add_prompt(1, 0, box=(2, 2, 9, 9))
        assert len(list(s.propagate())) == 12  # every slice, the prompted one included


class _BusyStandIn(http.server.BaseHTTPRequestHandler):
    """A server that is healthy and always busy, asking for a retry in 30 s; counts the requests it refused."""

    refused: list = []
    asked = threading.Event()

    def do_GET(self):
        self._answer(200, {"status": "ok", "protocol_version": protocol.PROTOCOL_VERSION})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).refused.append(self.path)
        self._answer(409, {"error": {"code": "busy", "message": "The server is busy: 8 users are active; retry in "
                                                                   "a moment."}}, {"Retry-After": "30"})
        type(self).asked.set()

    def _answer(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in dict(headers).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_a_cancel_ends_the_wait_for_a_busy_server_at_once():
    """Retry-After says 30 s and the client would wait up to 90: setting the caller's event ends it now."""
    stand_in = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BusyStandIn)
    threading.Thread(target=stand_in.serve_forever, daemon=True).start()
    try:
        client = MedSAM2Client(f"http://127.0.0.1:{stand_in.server_address[1]}", busy_retry_s=90)
        cancel, outcome, finished = threading.Event(), [], threading.Event()

        def open_it():
            try:
                client.open_session(random_volume((4, 8, 8)), cancel=cancel)
            except errors.MedSAM2Error as e:
                outcome.append(e)
            finished.set()

        threading.Thread(target=open_it, daemon=True).start()
        assert _BusyStandIn.asked.wait(10), "the client never asked"
        assert not finished.wait(0.3)  # it waits as told ...
        cancel.set()
        assert finished.wait(5), "the cancel did not end the wait"  # ... until cancelled (30 s otherwise)
        (error,) = outcome
        assert isinstance(error, errors.Cancelled) and isinstance(error, errors.Busy)
        assert "busy" in str(error) and "cancelled" in str(error)
        assert _BusyStandIn.refused == [protocol.SESSIONS]  # no retry after the cancel
    finally:
        stand_in.shutdown()
        stand_in.server_close()
