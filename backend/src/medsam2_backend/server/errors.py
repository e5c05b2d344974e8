"""The one error type routes raise: a stable protocol code plus a message the user can act on."""

from medsam2_client import protocol


class ApiError(Exception):
    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = protocol.HTTP_STATUS[code]
        # Busy answers that a retry can cure say when to retry (the client honours it).
        self.headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
