"""The client of the MedSAM2 server: standard library (http.client) and numpy only, so it runs inside 3D Slicer.

`RemoteSession` mirrors the engine's `VolumeSession` (same method and field names), so a caller can use either.
A volume the server already holds (same fingerprint) is not uploaded again. When the server has dropped a
session (idle timeout, eviction, restart), the session is re-opened transparently (up to `MAX_REOPENS` times per
call): the volume is re-sent only if the server no longer has it, the prompts of the live objects are replayed,
then the call is retried. A busy server (more users than it has room for) answers with `Retry-After`: the client
waits as told, backing off, for up to `busy_retry_s` in all (default `protocol.CLIENT_BUSY_RETRY_S`, 90 s), then
raises `errors.Busy`. That wait can be cancelled: pass `cancel` (a `threading.Event`) and set it from any thread;
the wait ends at once with `errors.Cancelled` (a `Busy`).
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import random
import socket
import time
import urllib.parse
import weakref

import numpy as np

from . import errors, protocol, wire

MAX_REOPENS = 3


@dataclasses.dataclass
class SliceMask:
    """One object's mask on one slice: the fields of the engine's `SliceResult` (without logits)."""

    obj_id: int
    slice_index: int
    mask: np.ndarray  # bool (H, W), the full slice
    object_score: float
    iou: float
    stage: str


class MedSAM2Client:
    """A connection profile for one server. `codec` "raw" or "zlib" (default: raw on loopback, else zlib)."""

    def __init__(self, url: str = f"http://127.0.0.1:{protocol.DEFAULT_PORT}", token: str | None = None,
                 timeout: float = 120.0, connect_timeout: float = 5.0, codec: str | None = None,
                 busy_retry_s: float = protocol.CLIENT_BUSY_RETRY_S):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise errors.BadRequest(f"The server address {url!r} is not an http:// or https:// URL.")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port or (443 if self._https else 80)
        self.token = token
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.codec = codec or ("raw" if protocol.is_loopback(self._host) else "zlib")
        self.busy_retry_s = busy_retry_s
        self._compatible = False
        # fingerprint -> the voxels a live session keeps for re-opening: sessions of one volume (on other axes,
        # say) keep one array between them, whatever copies their callers passed.
        self._volumes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    # ---- public -----------------------------------------------------------------------------------------------
    def health(self) -> dict:
        """The server's liveness and versions (no token needed); raises VersionMismatch on another protocol."""
        try:
            info = self.request_json("GET", protocol.HEALTH)
        except errors.NotFound:
            raise errors.VersionMismatch(f"{self.url} does not answer like a MedSAM2 server of this protocol "
                                         f"version ({protocol.PROTOCOL_VERSION}); check the address and update "
                                         f"the server or the extension.") from None
        version = info.get("protocol_version")
        if version != protocol.PROTOCOL_VERSION:
            raise errors.VersionMismatch(
                f"The MedSAM2 server at {self.url} speaks protocol version {version}, this extension "
                f"{protocol.PROTOCOL_VERSION}. Update the server or the extension so both are the same release.")
        self._compatible = True
        return info

    def capabilities(self) -> dict:
        """What the server offers: versions, model and checkpoint, limits, prompt and propagation options."""
        self._ensure_compatible()
        return self.request_json("GET", protocol.CAPABILITIES)

    def open_session(self, volume: np.ndarray, spacing=(1.0, 1.0, 1.0), axis: int = 0,
                     preprocessing: dict | None = None, fingerprint: str | None = None,
                     upload_progress=None, cancel=None) -> "RemoteSession":
        """A session on the server for `volume` (uploaded only if the server does not have it already).

        `fingerprint`: `wire.fingerprint(volume)` when the caller already has it (hashing 150 MB takes 0.1 s).
        `upload_progress(fraction)`: called with 0..1 while the volume is sent (not at all when it is not sent).
        `cancel`: a `threading.Event` that ends a wait for a busy server (`errors.Cancelled`); the session keeps it
        as its `cancel_event` for its later calls (assign another one per action).
        """
        self._ensure_compatible()
        return RemoteSession(self, volume, spacing, axis, preprocessing, fingerprint, upload_progress, cancel)

    # ---- transport --------------------------------------------------------------------------------------------
    def _ensure_compatible(self) -> None:
        if not self._compatible:
            self.health()

    def _headers(self, extra: dict | None = None) -> dict:
        # One connection per request, closed by the server after it: closing a response then closes the socket,
        # which is how an abandoned propagation stream tells the server to stop.
        h = {protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION), "Connection": "close"}
        if self.token:
            h[protocol.AUTHORIZATION] = f"Bearer {self.token}"
        h.update(extra or {})
        return h

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.connect_timeout)
        with self._translated_errors():
            conn.connect()
        conn.sock.settimeout(self.timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _translated_errors(self):
        return _TranslatedErrors(self)

    def retrying_busy(self, call, cancel=None):
        """`call()`, retried while the server answers busy with a Retry-After, for up to `busy_retry_s` in all.

        `cancel` (a `threading.Event`, or None): set from any thread, it ends the wait at once (`errors.Cancelled`);
        a call already sent is not interrupted."""
        deadline = time.monotonic() + self.busy_retry_s
        pause = 0.5
        while True:
            try:
                return call()
            except errors.Busy as e:
                remaining = deadline - time.monotonic()
                if e.retry_after is None or isinstance(e, errors.Cancelled):
                    raise
                if remaining <= 0:
                    raise errors.Busy(f"{e} It stayed busy for {self.busy_retry_s:g} s; try again later.",
                                      e.code) from None
                wait = min(max(e.retry_after, pause) * random.uniform(1.0, 1.3), remaining)
                if cancel is None:
                    time.sleep(wait)
                elif cancel.wait(wait):
                    raise errors.Cancelled(f"{e} Waiting for room was cancelled.", e.code) from None
                pause = min(2 * pause, 8.0)

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                cancel=None) -> http.client.HTTPResponse:
        """Send one request; a non-2xx answer raises the typed error. The caller reads (and closes) the response.

        A request whose body can be sent again is retried while the server is busy (see `retrying_busy`)."""
        if body is None or isinstance(body, bytes):
            return self.retrying_busy(lambda: self._request_once(method, path, body, headers), cancel)
        return self._request_once(method, path, body, headers)

    def _request_once(self, method: str, path: str, body, headers: dict | None) -> http.client.HTTPResponse:
        conn = self._connect()
        try:
            with self._translated_errors():
                try:
                    conn.request(method, path, body=body, headers=self._headers(headers))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server answered (and closed) before reading everything: read its answer
                response = conn.getresponse()
            if response.status >= 300:
                with self._translated_errors():
                    raw = response.read()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = None
                error = errors.from_error_body(payload, response.status)
                error.retry_after = _seconds(response.getheader("Retry-After"))
                raise error
            return response
        except BaseException:
            conn.close()
            raise

    def request_json(self, method: str, path: str, obj=None, cancel=None) -> dict:
        body = None if obj is None else json.dumps(obj).encode()
        response = self.request(method, path, body, {"Content-Type": "application/json"} if body else None,
                                cancel)
        with self._translated_errors():
            data = response.read()
        response.close()
        return json.loads(data)

    def upload_volume(self, volume: np.ndarray, fingerprint: str, progress=None, cancel=None) -> dict:
        """Send a volume the server lacks (retried while the server is busy making room for it)."""
        return self.retrying_busy(lambda: self._upload_once(volume, fingerprint, progress), cancel)

    def _upload_once(self, volume, fingerprint, progress) -> dict:
        header, chunks = wire.encode_volume(volume, self.codec, fingerprint, progress)
        extra = {"Content-Type": wire.VOLUME_MEDIA_TYPE}
        if self.codec == "raw":
            extra["Content-Length"] = str(len(header) + volume.nbytes)
        body = _chain(header, chunks)
        response = self.request("PUT", protocol.VOLUME.format(fingerprint=fingerprint), body, extra)
        with self._translated_errors():
            data = response.read()
        response.close()
        return json.loads(data)


class _TranslatedErrors:
    """Turns socket and HTTP library errors into the client's typed errors, naming the server."""

    def __init__(self, client: MedSAM2Client):
        self.client = client

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, errors.MedSAM2Error):
            return False
        url = self.client.url
        if isinstance(exc, ConnectionRefusedError):
            raise errors.ConnectionRefused(
                f"No MedSAM2 server answers at {url}. Start it (medsam2-server) or check the server address in "
                f"the module settings.") from exc
        if isinstance(exc, (TimeoutError, socket.timeout)):
            raise errors.Timeout(f"The MedSAM2 server at {url} did not answer within {self.client.timeout:g} s. "
                                 f"It may be overloaded or stuck; try again, or restart it.") from exc
        if isinstance(exc, (OSError, http.client.HTTPException, EOFError)):
            raise errors.BackendUnavailable(
                f"The connection to the MedSAM2 server at {url} was lost ({type(exc).__name__}). Check that the "
                f"server is still running, then try again.") from exc
        return False


def _seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None


def _chain(header: bytes, chunks):
    yield header
    yield from chunks


class RemoteSession:
    """A volume on the server; the same methods as the engine's `VolumeSession`."""

    def __init__(self, client: MedSAM2Client, volume: np.ndarray, spacing=(1.0, 1.0, 1.0), axis: int = 0,
                 preprocessing: dict | None = None, fingerprint: str | None = None, upload_progress=None,
                 cancel=None):
        self._client = client
        self.cancel_event = cancel  # a threading.Event ending this session's waits for a busy server (errors.Cancelled)
        try:
            volume = wire.wire_array(volume)
        except wire.WireFormatError as e:
            raise errors.BadRequest(str(e)) from None
        self.spacing = tuple(float(s) for s in spacing)
        self.axis = axis
        self._preprocessing = dict(preprocessing) if preprocessing else None
        self.fingerprint = fingerprint or wire.fingerprint(volume)
        self._volume = client._volumes.setdefault(self.fingerprint, volume)
        self._prompts: list[dict] = []  # the prompt requests of the live objects, replayed on re-open
        self.uploads = 0  # volume uploads so far (0 when the server already had the volume)
        self.reopened = 0  # transparent re-opens after the server dropped the session
        self.session_id: str | None = None
        self._upload_progress = upload_progress
        self._open()

    def _open(self) -> None:
        """Open by fingerprint; upload the volume only when the server lacks it (and once more if a crowded
        server dropped it again before the session could open)."""
        body = {"fingerprint": self.fingerprint, "spacing": list(self.spacing), "axis": self.axis,
                "preprocessing": self._preprocessing}
        for attempt in range(3):
            try:
                info = self._client.request_json("POST", protocol.SESSIONS, body, self.cancel_event)
                break
            except errors.NotFound:
                if attempt == 2:
                    raise
            self._client.upload_volume(self._volume, self.fingerprint, self._upload_progress, self.cancel_event)
            self.uploads += 1
        self.session_id = info["session_id"]
        self.num_slices = info["num_slices"]
        self.slice_shape = tuple(info["slice_shape"])

    def _path(self, route: str, **params) -> str:
        return route.format(session_id=self.session_id, **params)

    def _reopening(self, call):
        """Run `call`; if the server dropped the session, re-open it, replay the prompts and run it again."""
        for _ in range(MAX_REOPENS):
            try:
                return call()
            except errors.SessionExpired:
                pass
            try:
                self._open()
                for body in self._prompts:
                    self._send_prompt(body)
            except errors.SessionExpired:
                continue  # dropped again while re-opening (a crowded server): start over
            self.reopened += 1
        return call()

    # ---- the engine session's methods ---------------------------------------------------------------------------
    def add_prompt(self, obj_id: int, slice_index: int, *, points=None, labels=None, box=None, mask=None,
                   replace: bool = False) -> SliceMask:
        """Points (x = column, y = row), a box (x0, y0, x1, y1) or a mask for one object on one slice."""
        body = {"obj_id": _plain(obj_id), "slice_index": _plain(slice_index), "replace": bool(replace)}
        if points is not None:
            body["points"] = np.asarray(points, float).tolist()
        if labels is not None:
            body["labels"] = np.asarray(labels).tolist()
        if box is not None:
            body["box"] = np.asarray(box, float).reshape(-1).tolist()
        if mask is not None:
            try:
                body["mask"] = base64.b64encode(wire.encode_mask(mask)).decode()
            except wire.WireFormatError as e:
                raise errors.BadRequest(str(e)) from None
        result = self._reopening(lambda: self._send_prompt(body))
        self._prompts.append(body)
        return result

    def _send_prompt(self, body: dict) -> SliceMask:
        response = self._client.request("POST", self._path(protocol.PROMPTS), json.dumps(body).encode(),
                                        {"Content-Type": "application/json"}, self.cancel_event)
        with self._client._translated_errors():
            data = response.read()
        response.close()
        kind, payload = wire.read_frame(io.BytesIO(data))
        if kind != wire.SLICE:
            raise errors.ServerError("The server answered a prompt without a mask; check the server log.")
        return _slice_mask(wire.parse_slice(payload))

    def propagate(self, obj_ids=None, direction: str = "both", start: int | None = None, stop: int | None = None,
                  stop_after_empty: int | None = None, postprocess=()) -> "RemotePropagation":
        """Start a propagation; iterate the result for the slices as the server computes them."""
        body = {"obj_ids": None if obj_ids is None else [_plain(o) for o in obj_ids], "direction": direction,
                "start": _plain(start), "stop": _plain(stop), "stop_after_empty": _plain(stop_after_empty),
                "postprocess": list(postprocess)}
        return self._reopening(lambda: RemotePropagation(self, body))

    def set_preprocessing(self, preprocessing: dict | None) -> None:
        """Change the intensity mapping (a CT preset, level/width, percentiles, resize); prompts are kept."""
        options = dict(preprocessing or {})
        self._reopening(lambda: self._client.request_json("PUT", self._path(protocol.PREPROCESSING), options,
                                                          self.cancel_event))
        self._preprocessing = options or None

    def reset_object(self, obj_id: int) -> None:
        self._reopening(lambda: self._client.request_json("DELETE", self._path(protocol.OBJECT, obj_id=obj_id),
                                                          cancel=self.cancel_event))
        self._prompts = [b for b in self._prompts if b["obj_id"] != obj_id]

    def close(self) -> None:
        """Free the session on the server (a session that is gone already is fine)."""
        try:
            self._client.request_json("DELETE", self._path(protocol.SESSION))
        except errors.SessionExpired:
            pass
        self._prompts = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RemotePropagation:
    """A propagation streaming from the server: `planned` at once, then the slices, then `summary`."""

    def __init__(self, session: RemoteSession, body: dict):
        self._session = session
        self._client = session._client
        self._response = self._client.request("POST", session._path(protocol.PROPAGATE), json.dumps(body).encode(),
                                              {"Content-Type": "application/json"}, session.cancel_event)
        self._cancelled = False
        self.summary: PropagationSummary | None = None
        self.done = 0
        self.received = 0  # slice frames read (and acknowledged every few, so the server keeps computing)
        try:
            kind, payload = self._next_frame()
            if kind != wire.START:
                raise errors.ServerError("The server's propagation stream did not start properly; check its log.")
            start = json.loads(payload)
            self.planned = start["planned"]
            self._ack_every = max(1, start["window"] // 2)  # acknowledge well before the server's window is full
        except BaseException:
            self.close()  # nobody will iterate this stream: free its connection now
            raise

    def _next_frame(self) -> tuple[int, bytes]:
        with self._client._translated_errors():
            item = wire.read_frame(self._response)
        if item is None:
            raise errors.BackendUnavailable(
                f"The MedSAM2 server at {self._client.url} stopped sending before the propagation finished (did "
                f"it stop or restart?). The slices received so far are kept; propagate again when it is back.")
        kind, payload = item
        if kind == wire.ERROR:
            raise errors.from_error_body(json.loads(payload), 500)
        return kind, payload

    def __iter__(self):
        try:
            while self.summary is None:
                kind, payload = self._next_frame()
                if kind == wire.SUMMARY:
                    self.summary = _summary(json.loads(payload))
                elif kind == wire.SLICE:
                    f = wire.parse_slice(payload)
                    self.done = f.done
                    self.received += 1
                    if self.received % self._ack_every == 0:
                        self._acknowledge()
                    if not self._cancelled:
                        yield _slice_mask(f)
        finally:
            self.close()

    def _acknowledge(self) -> None:
        try:
            self._client.request_json("POST", self._session._path(protocol.ACKNOWLEDGE), {"received": self.received})
        except errors.SessionExpired:
            pass  # the stream's own frames say how it ends

    def cancel(self) -> None:
        """Ask the server to stop after the slice it is computing (safe from any thread)."""
        self._cancelled = True
        try:
            self._client.request_json("POST", self._session._path(protocol.CANCEL))
        except errors.SessionExpired:
            pass

    def close(self) -> None:
        """Stop reading; an unfinished propagation is cancelled by the server when the connection closes."""
        self._response.close()


def _slice_mask(f: wire.SliceFrame) -> SliceMask:
    return SliceMask(f.obj_id, f.slice_index, f.mask, f.object_score, f.iou, f.stage)


@dataclasses.dataclass
class PropagationSummary:
    """How a propagation ended; the same fields as the engine's summary, so callers treat both alike."""

    planned: int
    slices_done: int
    cancelled: bool
    stopped_early: dict  # (obj_id, direction) -> slice where it stopped
    least_certain: dict  # obj_id -> [(slice, predicted IoU)], lowest first


def _summary(s: dict) -> PropagationSummary:
    return PropagationSummary(
        s["planned"], s["slices_done"], s["cancelled"],
        {(e["obj_id"], e["direction"]): e["slice_index"] for e in s["stopped_early"]},
        {int(o): [(k, iou) for k, iou in items] for o, items in s["least_certain"].items()})


def _plain(x):
    """numpy integers as Python ints, so they serialise as JSON numbers."""
    return x.item() if isinstance(x, np.generic) else x
