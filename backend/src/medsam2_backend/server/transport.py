"""uvicorn as the server runs it: a bound on connections and a deadline for a request's headers.

uvicorn (h11) waits for headers forever, so a few hundred half-open sockets would hold the server's connections;
`DeadlineH11Protocol` closes a connection that has not sent a whole request head within `header_timeout_s`.
A body that stops arriving is the `Gate`'s concern (its idle deadline).
"""

from __future__ import annotations

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from medsam2_client import protocol


class DeadlineH11Protocol(H11Protocol):
    header_timeout_s = protocol.HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        if self.cycle is None and not self.transport.is_closing():  # no request head arrived in time
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._header_deadline.cancel()
        super().connection_lost(exc)


def uvicorn_config(app, host: str, port: int, *, log_level: str = "info",
                   max_connections: int = protocol.DEFAULT_MAX_CONNECTIONS,
                   header_timeout_s: float = protocol.HEADER_TIMEOUT_S) -> uvicorn.Config:
    protocol_class = type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"header_timeout_s": header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol_class,
                          limit_concurrency=max_connections, timeout_keep_alive=5)
