"""What can go wrong talking to the backend, each with a message a radiologist can act on.

Every exception is a `MedSAM2Error`, so the Slicer module can catch one type and show `str(error)`.
"""


class MedSAM2Error(Exception):
    """Base of every client error; `code` is the server's stable error code when the server sent one."""

    code = None
    retry_after = None  # seconds, when the server said a retry can succeed (a busy server)

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class BackendUnavailable(MedSAM2Error):
    """The server could not be reached, or the connection broke while it was answering."""


class ConnectionRefused(BackendUnavailable):
    """Nothing listens at the server address."""


class Timeout(BackendUnavailable):
    """The server did not answer in time."""


class VersionMismatch(MedSAM2Error):
    """The server speaks another protocol version than this client."""


class Unauthorized(MedSAM2Error):
    code = "unauthorized"


class BadRequest(MedSAM2Error):
    code = "bad_request"


class NotFound(MedSAM2Error):
    code = "not_found"


class SessionExpired(MedSAM2Error):
    code = "session_expired"


class TooLarge(MedSAM2Error):
    code = "too_large"


class Busy(MedSAM2Error):
    code = "busy"


class Cancelled(Busy):
    """The caller cancelled while the client waited for a busy server to make room (a `Busy` that ended early)."""


class ServerError(MedSAM2Error):
    code = "internal"


BY_CODE = {cls.code: cls for cls in (Unauthorized, BadRequest, NotFound, SessionExpired, TooLarge, Busy, ServerError)}


def from_error_body(body: dict | None, status: int) -> MedSAM2Error:
    """The typed exception for a server error body `{"error": {"code", "message"}}` (or a non-JSON answer)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return ServerError(f"The server answered HTTP {status} without an explanation; check that the address "
                           f"points to a MedSAM2 server and look at its log.")
    return BY_CODE.get(err.get("code"), ServerError)(err["message"], err.get("code"))
