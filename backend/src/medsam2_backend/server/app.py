"""The HTTP API (FastAPI) in front of an engine. Routes are thin: decode, call the session manager, encode.

Every error leaves as `{"error": {"code", "message"}}` with a stable code (see `medsam2_client.protocol`); bad
input never stops the server. The server never opens a file a client names: volumes arrive in the request body.
Host, token and protocol version are checked by the `Gate` before any body byte is read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError)
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsam2_client import protocol, wire

from .. import __version__
from ..engine import DIRECTIONS, POSTPROCESS_STEPS, EngineInputError
from ..engine.preprocess import (ALLOWED_DTYPES, CT_PRESETS, MAX_SLICE_SIDE, RESIZE_MODES, validate_shape,
                                 validate_volume)
from .errors import ApiError
from .gate import Gate, HostCheck
from .sessions import SessionManager
from .streaming import PropagationStream

log = logging.getLogger(__name__)
Number = Annotated[float, Field(allow_inf_nan=False)]
Whole = Annotated[StrictInt, Field(ge=0, lt=2**31)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessingOptions(_Request):
    """The JSON form of the engine's `Preprocessing`: types checked here, meaning checked by the engine."""

    preset: StrictStr | None = None
    level: Number | None = None
    width: Number | None = None
    percentiles: tuple[Number, Number] | None = None
    resize: StrictStr | None = None


class OpenSession(_Request):
    fingerprint: StrictStr = Field(pattern=r"^[0-9a-f]{32}$")
    spacing: tuple[Number, Number, Number] = (1.0, 1.0, 1.0)
    axis: StrictInt = 0
    preprocessing: PreprocessingOptions | None = None


class PromptRequest(_Request):
    obj_id: StrictInt
    slice_index: StrictInt
    points: list[tuple[Number, Number]] | None = None
    labels: list[StrictInt] | None = None
    box: tuple[Number, Number, Number, Number] | None = None
    mask: StrictStr | None = None  # base64 of `wire.encode_mask`
    replace: StrictBool = False


class PropagateRequest(_Request):
    obj_ids: list[StrictInt] | None = None
    direction: StrictStr = "both"
    start: StrictInt | None = None
    stop: StrictInt | None = None
    stop_after_empty: StrictInt | StrictFloat | None = None
    postprocess: list[StrictStr] = []


class Acknowledgement(_Request):
    received: Whole


def _options(p: PreprocessingOptions | None) -> dict | None:
    return None if p is None else p.model_dump(exclude_none=True)


def _decode_mask_prompt(text: str | None, slice_shape):
    if text is None:
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ApiError(protocol.BAD_REQUEST, "The mask prompt is not valid base64.") from None
    return wire.decode_mask(data, expected_shape=slice_shape)  # the declared shape first, then the bits


def _parse(model: type[BaseModel], raw: bytes | str, what: str) -> BaseModel:
    """A JSON document checked against `model`; bad JSON, deep nesting and wrong types are one sentence each."""
    try:
        return model.model_validate(json.loads(raw))
    except RecursionError:
        raise ApiError(protocol.BAD_REQUEST, f"{what} is nested too deeply.") from None
    except ValidationError as e:
        raise ApiError(protocol.BAD_REQUEST, f"Invalid {what.lower()}: " + _describe_validation(e.errors())) \
            from None
    except ValueError:
        raise ApiError(protocol.BAD_REQUEST, f"{what} is not valid JSON.") from None


def _error(code: str, message: str) -> JSONResponse:
    return JSONResponse(ApiError(code, message).body(), status_code=protocol.HTTP_STATUS[code])


def make_app(engine, *, token: str | None = None, max_sessions: int = protocol.DEFAULT_MAX_SESSIONS,
             memory_budget_bytes: int = protocol.DEFAULT_MEMORY_BUDGET_BYTES,
             idle_timeout_s: float = protocol.DEFAULT_IDLE_TIMEOUT_S,
             max_upload_bytes: int = protocol.DEFAULT_MAX_UPLOAD_BYTES, busy_wait_s: float = 30.0,
             eviction_grace_s: float = protocol.DEFAULT_EVICTION_GRACE_S, bound_to_loopback: bool = True,
             allowed_hosts=(), docs: bool = False, body_idle_s: float = protocol.DEFAULT_BODY_IDLE_S,
             stall_timeout_s: float = protocol.DEFAULT_STALL_TIMEOUT_S, reaper_period_s: float | None = None,
             max_objects: int = protocol.MAX_OBJECTS_PER_SESSION) -> FastAPI:
    """The app serving `engine`; with `token`, every route but /v1/health needs `Authorization: Bearer <token>`.

    `docs` serves /docs, /redoc and /openapi.json (behind the token); `reaper_period_s` is how often idle
    sessions are expired in the background (default: a tenth of the idle timeout, 1 to 60 s).
    """
    manager = SessionManager(engine, max_sessions=max_sessions, memory_budget_bytes=memory_budget_bytes,
                             idle_timeout_s=idle_timeout_s, busy_wait_s=busy_wait_s,
                             eviction_grace_s=eviction_grace_s, max_objects=max_objects)
    period = reaper_period_s or min(60.0, max(1.0, idle_timeout_s / 10))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def reap():
            while True:
                await asyncio.sleep(period)
                try:
                    await run_in_threadpool(manager.sweep)
                except Exception:
                    log.exception("the session reaper failed; it tries again")
        task = asyncio.create_task(reap())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="MedSAM2 segmentation server", version=__version__, lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.manager = manager
    app.add_middleware(Gate, token=token, hosts=HostCheck(bound_to_loopback, allowed_hosts),
                       max_json_bytes=protocol.MAX_JSON_BYTES, body_idle_s=body_idle_s)

    # ---- errors -------------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(EngineInputError)
    async def engine_input_error(request, exc):
        return _error(protocol.BAD_REQUEST, str(exc))

    @app.exception_handler(wire.WireFormatError)
    async def wire_error(request, exc):
        code = protocol.TOO_LARGE if isinstance(exc, wire.VolumeTooLarge) else protocol.BAD_REQUEST
        return _error(code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error(protocol.BAD_REQUEST, "Invalid request: " + _describe_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        if exc.status_code == 404:
            return _error(protocol.NOT_FOUND, f"There is no {request.method} {request.url.path} on this server; "
                          f"check the server address and that client and server versions match.")
        return _error(protocol.BAD_REQUEST, f"{request.method} {request.url.path}: {exc.detail}.")

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(protocol.INTERNAL, "The server hit an unexpected error; it keeps running. Details are in "
                      "the server log.")

    # ---- routes -------------------------------------------------------------------------------------------------
    v1 = APIRouter()

    @v1.get(protocol.HEALTH)
    def health() -> dict:
        return {"status": "ok", "protocol_version": protocol.PROTOCOL_VERSION, "server_version": __version__}

    @v1.get(protocol.CAPABILITIES)
    def capabilities() -> dict:
        described = engine.describe()
        caps = {
            "protocol_version": protocol.PROTOCOL_VERSION, "server_version": __version__, "engine": described,
            "limits": {"max_sessions": max_sessions, "memory_budget_bytes": memory_budget_bytes,
                       "idle_timeout_s": idle_timeout_s, "max_upload_bytes": max_upload_bytes,
                       "max_json_bytes": protocol.MAX_JSON_BYTES, "max_slice_side": MAX_SLICE_SIDE,
                       "max_objects_per_session": max_objects, "eviction_grace_s": eviction_grace_s,
                       "stall_timeout_s": stall_timeout_s},
            "volume": {"format_version": wire.VOLUME_VERSION, "codecs": list(wire.CODECS),
                       "dtypes": [t.__name__ for t in ALLOWED_DTYPES]},
            "prompt_types": list(protocol.PROMPT_TYPES),
            "propagation": {"directions": list(DIRECTIONS), "postprocess": list(POSTPROCESS_STEPS),
                            "range": True, "stop_after_empty": True, "cancel": True},
            "preprocessing": {"ct_presets": list(CT_PRESETS), "resize": list(RESIZE_MODES)},
            "precisions": list(protocol.PRECISIONS),
        }
        if described.get("random_weights"):
            from ..engine.model import RANDOM_WEIGHTS_WARNING

            caps["warning"] = RANDOM_WEIGHTS_WARNING
        return caps

    @v1.put(protocol.VOLUME, status_code=201)
    async def upload_volume(fingerprint: str, request: Request) -> dict:
        """A volume the server lacks (the client asked first); its declared size is admitted before receiving it."""
        if not request.headers.get("content-type", "").startswith(wire.VOLUME_MEDIA_TYPE):
            raise ApiError(protocol.BAD_REQUEST, f"Send the volume as {wire.VOLUME_MEDIA_TYPE}.")
        if manager.cached_volume(fingerprint) is None:
            volume, header, reservation = await _receive_volume(request, max_upload_bytes, manager, fingerprint)
            with reservation:
                validate_volume(volume)  # NaN voxels, say: refused now rather than kept
                manager.add_volume(header.fingerprint, volume, reservation)
        return {"fingerprint": fingerprint}

    @v1.post(protocol.SESSIONS, status_code=201)
    async def open_session(request: Request) -> dict:
        """A session on a volume the server holds, by fingerprint; 404 asks the client to upload it first."""
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise ApiError(protocol.BAD_REQUEST, "Open a session with JSON naming the volume's fingerprint.")
        req = _parse(OpenSession, await request.body(), "The request")
        volume = manager.cached_volume(req.fingerprint)
        if volume is None:
            raise ApiError(protocol.NOT_FOUND, "The server does not have this volume; upload it first.")
        s = await run_in_threadpool(manager.create, volume, req.fingerprint, req.spacing, req.axis,
                                    _options(req.preprocessing))
        return _session_info(s)

    @v1.delete(protocol.SESSION)
    def close_session(session_id: str) -> dict:
        manager.cancel(session_id)  # a running propagation stops after its current slice
        manager.close(session_id)
        return {"closed": True}

    @v1.post(protocol.PROMPTS)
    def add_prompt(session_id: str, req: PromptRequest) -> Response:
        with manager.use(session_id) as s:
            es = s.engine_session
            mask = _decode_mask_prompt(req.mask, es.slice_shape)
            with manager.admit_object(s, req.obj_id, mask is not None):
                r = es.add_prompt(req.obj_id, req.slice_index, points=req.points, labels=req.labels, box=req.box,
                                  mask=mask, replace=req.replace)
        return Response(wire.slice_frame(r.obj_id, r.slice_index, r.mask, r.object_score, r.iou, r.stage, 1, 1),
                        media_type=wire.FRAMES_MEDIA_TYPE)

    @v1.post(protocol.PROPAGATE)
    async def propagate(session_id: str, req: PropagateRequest, request: Request) -> StreamingResponse:
        obj_ids = None if req.obj_ids is None else list(dict.fromkeys(req.obj_ids))  # each object once
        s = await run_in_threadpool(manager.acquire, session_id)
        try:
            run = manager.plan_propagation(s, obj_ids, req.direction, req.start, req.stop, req.stop_after_empty,
                                           req.postprocess)
        except BaseException:
            manager.release(s)
            raise
        stream = PropagationStream(manager, s, run, asyncio.get_running_loop(), stall_s=stall_timeout_s)
        stream.start()
        return StreamingResponse(stream.body(request), media_type=wire.FRAMES_MEDIA_TYPE,
                                 headers={"Cache-Control": "no-store"})

    @v1.post(protocol.ACKNOWLEDGE)
    def acknowledge(session_id: str, req: Acknowledgement) -> dict:
        stream = manager.get(session_id).stream
        if stream is not None:
            stream.acknowledge(req.received)
        return {"ok": True}

    @v1.post(protocol.CANCEL)
    def cancel(session_id: str) -> dict:
        return {"cancelled": manager.cancel(session_id)}

    @v1.put(protocol.PREPROCESSING)
    def set_preprocessing(session_id: str, options: PreprocessingOptions) -> dict:
        with manager.use(session_id) as s:
            s.engine_session.set_preprocessing(_options(options))
        return {"ok": True}

    @v1.delete(protocol.OBJECT)
    def reset_object(session_id: str, obj_id: int) -> dict:
        with manager.use(session_id) as s:
            s.engine_session.reset_object(obj_id)
        return {"ok": True}

    app.include_router(v1)
    return app


async def _receive_volume(request: Request, max_body_bytes: int, manager: SessionManager, fingerprint: str):
    """Decode the upload as it arrives: its declared size is admitted (shape limits, memory budget) before any
    voxel is allocated, and it is refused as soon as it is too large (body or voxels) or malformed."""
    declared = request.headers.get("content-length")
    too_large = ApiError(protocol.TOO_LARGE, f"The upload is larger than this server accepts "
                         f"({max_body_bytes / 2**20:.4g} MiB); crop the volume or raise --max-upload-mb.")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes + wire.VOLUME_HEADER_SIZE:
        raise too_large
    reservations = []

    def admit(header: wire.VolumeHeader) -> None:
        if header.fingerprint != fingerprint:
            raise ApiError(protocol.BAD_REQUEST, "The volume's header names another fingerprint than its address.")
        validate_shape(header.shape)
        reservations.append(manager.admit_volume(header.raw_nbytes))

    decoder = wire.VolumeDecoder(max_body_bytes, admit=admit)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body_bytes + wire.VOLUME_HEADER_SIZE:
                raise too_large
            decoder.feed(chunk)
        volume, header = decoder.finish()
    except BaseException:
        for r in reservations:
            r.release()
        raise
    return volume, header, reservations[0]


def _session_info(s) -> dict:
    es = s.engine_session
    return {"session_id": s.id, "fingerprint": s.fingerprint, "shape": list(s.volume.shape),
            "dtype": s.volume.dtype.name, "axis": es.axis, "spacing": list(es.spacing),
            "num_slices": es.num_slices, "slice_shape": list(es.slice_shape)}


def _describe_validation(errors) -> str:
    parts = []
    for e in errors[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) + "."
