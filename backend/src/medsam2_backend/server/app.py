"""The HTTP API (FastAPI) in front of an engine. Routes are thin: decode, call the session manager, encode.

Every error leaves as `{"error": {"code", "message"}}` with a stable code (see `medsam2_client.protocol`); bad
input never stops the server. The server never opens a file a client names: volumes arrive in the request body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsam2_client import protocol, wire

from .. import __version__
from ..engine import DIRECTIONS, POSTPROCESS_STEPS, EngineInputError, Preprocessing
from ..engine.preprocess import ALLOWED_DTYPES, CT_PRESETS, MAX_SLICE_SIDE, RESIZE_MODES
from .errors import ApiError
from .sessions import SessionManager
from .streaming import PropagationStream

log = logging.getLogger(__name__)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenByFingerprint(_Request):
    fingerprint: str = Field(pattern=r"^[0-9a-f]{32}$")
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    axis: StrictInt = 0
    preprocessing: dict | None = None


class PromptRequest(_Request):
    obj_id: StrictInt
    slice_index: StrictInt
    points: list[list[float]] | None = None
    labels: list[StrictInt] | None = None
    box: list[float] | None = None
    mask: str | None = None  # base64 of `wire.encode_mask`
    replace: StrictBool = False


class PropagateRequest(_Request):
    obj_ids: list[StrictInt] | None = None
    direction: str = "both"
    start: StrictInt | None = None
    stop: StrictInt | None = None
    stop_after_empty: StrictInt | None = None
    postprocess: list[str] = []


def _decode_mask_prompt(text: str | None):
    if text is None:
        return None
    try:
        return wire.decode_mask(base64.b64decode(text, validate=True))
    except binascii.Error:
        raise ApiError(protocol.BAD_REQUEST, "The mask prompt is not valid base64.") from None


def _error(code: str, message: str) -> JSONResponse:
    return JSONResponse(ApiError(code, message).body(), status_code=protocol.HTTP_STATUS[code])


class _JsonSizeLimit:
    """Refuses request bodies over `limit` bytes (except volume uploads, limited by their own route)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"] == protocol.SESSIONS):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await _error(protocol.TOO_LARGE, f"The request is larger than {self.limit >> 20} MiB.")(
                scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ApiError(protocol.TOO_LARGE, f"The request is larger than {self.limit >> 20} MiB.")
            return message

        await self.app(scope, limited_receive, send)


def make_app(engine, *, token: str | None = None, max_sessions: int = protocol.DEFAULT_MAX_SESSIONS,
             memory_budget_bytes: int = protocol.DEFAULT_MEMORY_BUDGET_BYTES,
             idle_timeout_s: float = protocol.DEFAULT_IDLE_TIMEOUT_S,
             max_upload_bytes: int = protocol.DEFAULT_MAX_UPLOAD_BYTES, busy_wait_s: float = 30.0) -> FastAPI:
    """The app serving `engine`; with `token`, every route but /v1/health needs `Authorization: Bearer <token>`."""
    manager = SessionManager(engine, max_sessions=max_sessions, memory_budget_bytes=memory_budget_bytes,
                             idle_timeout_s=idle_timeout_s, busy_wait_s=busy_wait_s)
    app = FastAPI(title="MedSAM2 segmentation server", version=__version__)
    app.state.manager = manager
    app.add_middleware(_JsonSizeLimit, limit=protocol.MAX_JSON_BYTES)
    expected = token.encode() if token else None

    def check_request(authorization: str | None = Header(None),
                      x_medsam2_protocol: str | None = Header(None)) -> None:
        if x_medsam2_protocol is not None and x_medsam2_protocol != str(protocol.PROTOCOL_VERSION):
            raise ApiError(protocol.BAD_REQUEST, f"The client speaks protocol {x_medsam2_protocol}, this server "
                           f"{protocol.PROTOCOL_VERSION}; update the extension or the server so they match.")
        if expected is None:
            return
        given = authorization[7:].encode() if authorization and authorization.startswith("Bearer ") else b""
        if not hmac.compare_digest(given, expected):
            raise ApiError(protocol.UNAUTHORIZED, "The server refused the access token. Enter the token the "
                           "server was started with in the module settings.")

    # ---- errors -------------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

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
    guarded = APIRouter(dependencies=[Depends(check_request)])

    @v1.get(protocol.HEALTH)
    def health() -> dict:
        return {"status": "ok", "protocol_version": protocol.PROTOCOL_VERSION, "server_version": __version__}

    @guarded.get(protocol.CAPABILITIES)
    def capabilities() -> dict:
        described = engine.describe()
        caps = {
            "protocol_version": protocol.PROTOCOL_VERSION, "server_version": __version__, "engine": described,
            "limits": {"max_sessions": max_sessions, "memory_budget_bytes": memory_budget_bytes,
                       "idle_timeout_s": idle_timeout_s, "max_upload_bytes": max_upload_bytes,
                       "max_json_bytes": protocol.MAX_JSON_BYTES, "max_slice_side": MAX_SLICE_SIDE},
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

    @guarded.post(protocol.SESSIONS, status_code=201)
    async def open_session(request: Request) -> dict:
        """A JSON body asks for a volume the server already has (by fingerprint); a volume body uploads one."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            try:
                req = OpenByFingerprint.model_validate(json.loads(await request.body()))
            except (ValueError, ValidationError) as e:
                errors = e.errors() if isinstance(e, ValidationError) else None
                raise ApiError(protocol.BAD_REQUEST, "Invalid request: " + (
                    _describe_validation(errors) if errors else "the body is not valid JSON.")) from None
            volume = manager.cached_volume(req.fingerprint)
            if volume is None:
                raise ApiError(protocol.NOT_FOUND, "The server does not have this volume yet; upload it.")
            s = await run_in_threadpool(manager.create, volume, req.fingerprint, req.spacing, req.axis,
                                        req.preprocessing)
            return _session_info(s)
        if not content_type.startswith(wire.VOLUME_MEDIA_TYPE):
            raise ApiError(protocol.BAD_REQUEST, f"Send a volume as {wire.VOLUME_MEDIA_TYPE}, or JSON with its "
                           f"fingerprint.")
        options = request.headers.get(protocol.PREPROCESSING_HEADER)
        try:
            preprocessing = json.loads(options) if options else None
        except ValueError:
            raise ApiError(protocol.BAD_REQUEST, f"The {protocol.PREPROCESSING_HEADER} header is not JSON.") \
                from None
        volume, header = await _receive_volume(request, max_upload_bytes)
        s = await run_in_threadpool(manager.create, volume, header.fingerprint, header.spacing, header.axis,
                                    preprocessing)
        return _session_info(s)

    @guarded.delete(protocol.SESSION)
    def close_session(session_id: str) -> dict:
        manager.cancel(session_id)  # a running propagation stops after its current slice
        manager.close(session_id)
        return {"closed": True}

    @guarded.post(protocol.PROMPTS)
    def add_prompt(session_id: str, req: PromptRequest) -> Response:
        mask = _decode_mask_prompt(req.mask)
        with manager.use(session_id) as s:
            r = s.engine_session.add_prompt(req.obj_id, req.slice_index, points=req.points, labels=req.labels,
                                            box=req.box, mask=mask, replace=req.replace)
        return Response(wire.slice_frame(r.obj_id, r.slice_index, r.mask, r.object_score, r.iou, r.stage, 1, 1),
                        media_type=wire.FRAMES_MEDIA_TYPE)

    @guarded.post(protocol.PROPAGATE)
    async def propagate(session_id: str, req: PropagateRequest, request: Request) -> StreamingResponse:
        s = await run_in_threadpool(manager.acquire, session_id)
        try:
            run = s.engine_session.propagate(req.obj_ids, req.direction, req.start, req.stop,
                                             req.stop_after_empty, req.postprocess)
        except BaseException:
            manager.release(s)
            raise
        stream = PropagationStream(manager, s, run, asyncio.get_running_loop())
        stream.start()
        return StreamingResponse(stream.body(request), media_type=wire.FRAMES_MEDIA_TYPE,
                                 headers={"Cache-Control": "no-store"})

    @guarded.post(protocol.CANCEL)
    def cancel(session_id: str) -> dict:
        return {"cancelled": manager.cancel(session_id)}

    @guarded.put(protocol.PREPROCESSING)
    def set_preprocessing(session_id: str, options: dict) -> dict:
        preprocessing = Preprocessing.from_options(options)
        with manager.use(session_id) as s:
            s.engine_session.set_preprocessing(preprocessing)
        return {"ok": True}

    @guarded.delete(protocol.OBJECT)
    def reset_object(session_id: str, obj_id: int) -> dict:
        with manager.use(session_id) as s:
            s.engine_session.reset_object(obj_id)
        return {"ok": True}

    app.include_router(v1)
    app.include_router(guarded)
    return app


async def _receive_volume(request: Request, max_body_bytes: int):
    """Decode the upload as it arrives, refusing it as soon as it is too large (body or voxels) or malformed."""
    declared = request.headers.get("content-length")
    too_large = ApiError(protocol.TOO_LARGE, f"The upload is larger than this server accepts "
                         f"({max_body_bytes / 2**20:.4g} MiB); crop the volume or raise --max-upload-mb.")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    decoder = wire.VolumeDecoder(max_body_bytes)
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_body_bytes:
            raise too_large
        decoder.feed(chunk)
    return decoder.finish()


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
