"""uvicorn's h11 protocol with a deadline for a request's headers.

uvicorn has no timeout for receiving a request (uvicorn issue #157, open since 2018): its keep-alive timer
only covers silence between requests and is reset by every byte, so a client that sends half a header
line, or a byte every few seconds, holds its connection forever (slowloris). Deployments put nginx in
front for that; a model served straight from `trainer serve` gets it here instead: the headers of each
request must be complete within `header_timeout` seconds of the connection opening, or of the previous
response ending on a kept-alive connection, else the connection is closed. Bodies are not timed (an
upload on a slow link may take long; --max-upload-mb caps its size).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets the same time for its headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()


def with_header_timeout(seconds: float) -> Any:
    """The protocol class for uvicorn's `http=` setting, with its header deadline set to SECONDS."""
    return type("HeaderDeadline", (HeaderDeadlineProtocol,), {"header_timeout": seconds})

