"""The one error type routes raise: a stable protocol code plus a message the user can act on."""

from medsam2_client import protocol


class ApiError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = protocol.HTTP_STATUS[code]

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
