"""The ASGI edge in front of every route: Host, token and protocol version are checked before a body byte is read.

A request that fails here costs the server its headers only. Every other body than a volume upload is read here,
bounded by the JSON cap (413 as soon as it is exceeded, chunked or not) and by an idle deadline, and handed to the
app from memory; a volume upload streams on to its route, under the same idle deadline.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress

from fastapi.responses import JSONResponse

from medsam2_client import protocol, wire

from .errors import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8765" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostCheck:
    """Which Host headers the server answers: loopback names on a loopback server (no DNS rebinding), the
    `--allowed-hosts` names besides; a server on another address answers any name unless names are given."""

    def __init__(self, bound_to_loopback: bool, allowed_hosts=()):
        self.names = {host_name(h) for h in allowed_hosts if h.strip()}
        self.loopback = bound_to_loopback
        self.any = "*" in self.names or (not bound_to_loopback and not self.names)

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:
            return False
        name = host_name(header)
        return name in self.names or (self.loopback and is_loopback_name(name))


def is_volume_upload(scope) -> bool:
    if scope["method"] not in ("POST", "PUT"):
        return False
    content_type = _header(scope, b"content-type") or ""
    return content_type.startswith(wire.VOLUME_MEDIA_TYPE)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _respond(error: ApiError):
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Gate:
    """ASGI middleware: refuse a request on its headers alone when it can be refused, then bound its body."""

    def __init__(self, app, *, token: str | None, hosts: HostCheck, max_json_bytes: int, body_idle_s: float,
                 open_paths=(protocol.HEALTH,)):
        self.app = app
        self.expected = token.encode() if token else None
        self.hosts = hosts
        self.max_json_bytes = max_json_bytes
        self.body_idle_s = body_idle_s
        self.open_paths = set(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            return await _respond(refusal)(scope, receive, send)
        receive = self._deadline(receive)
        if is_volume_upload(scope):
            return await self.app(scope, receive, send)
        try:
            body = await self._read_json_body(scope, receive)
        except ApiError as e:
            return await _respond(e)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect a streaming response waits for

        await self.app(scope, replay, send)

    def refusal(self, scope) -> ApiError | None:
        host = _header(scope, b"host")
        if not self.hosts.allows(host):
            return ApiError(protocol.BAD_REQUEST, f"This server does not answer to the host name {host!r}; it "
                            f"answers loopback names, or those given with --allowed-hosts (behind a reverse proxy, "
                            f"add the proxy's public name there).")
        if scope["path"] in self.open_paths:
            return None
        if self.expected is not None:
            authorization = _header(scope, b"authorization") or ""
            given = authorization[7:].encode() if authorization.startswith("Bearer ") else b""
            if not hmac.compare_digest(given, self.expected):
                return ApiError(protocol.UNAUTHORIZED, "The server refused the access token. Enter the token "
                                "the server was started with in the module settings.")
        spoken = _header(scope, protocol.PROTOCOL_HEADER.lower().encode())
        if spoken is not None and spoken != str(protocol.PROTOCOL_VERSION):
            return ApiError(protocol.BAD_REQUEST, version_sentence(spoken))
        return None

    def _deadline(self, receive):
        """`receive` bounded by the idle-body deadline while the body arrives; after its last part, unbounded: a
        streaming response then waits on `receive()` for the client's disconnect for as long as it streams."""
        body_done = False

        async def receive_within_deadline():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_idle_s)
            except asyncio.TimeoutError:
                raise ApiError(protocol.BAD_REQUEST, f"The request body stopped arriving for "
                               f"{self.body_idle_s:g} s; send the request again.") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message
        return receive_within_deadline

    async def _read_json_body(self, scope, receive) -> bytes:
        limit = self.max_json_bytes
        too_large = ApiError(protocol.TOO_LARGE, f"The request body is larger than the {limit >> 20} MiB this "
                             f"server accepts for a JSON request.")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise too_large
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(protocol.BAD_REQUEST, "The client left before sending the whole request.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def version_sentence(spoken: str) -> str:
    """What to update when a client speaks another protocol version than this server."""
    newer = spoken.isdigit() and int(spoken) > protocol.PROTOCOL_VERSION
    update = "the server (medsam2-server)" if newer else "the MedSAM2 extension in Slicer (its medsam2_client)"
    return (f"The client speaks protocol {spoken}, this server {protocol.PROTOCOL_VERSION}; update {update} so "
            f"both are the same release.")
