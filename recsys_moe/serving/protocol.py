"""uvicorn's HTTP protocol with a deadline for receiving each request.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but a connection that
sends half a request line, half its headers or half its body is kept open for as long as the
client likes: enough of them exhaust the server. Here every request must arrive whole within
`request_timeout` seconds of the connection opening (or of the previous response); otherwise the
connection is closed, and the handler waiting for the rest of the body sees a disconnect.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class TimedHttpProtocol(HttpToolsProtocol):
    request_timeout: float = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()  # the request is in: the handler may take as long as it needs
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        if not self.transport.is_closing():
            log.info("closed a connection that did not send a whole request in %.0f s", self.request_timeout)
            self.transport.close()


def timed_protocol(request_timeout: float) -> type[TimedHttpProtocol]:
    """The protocol class for uvicorn's `http=`, with this deadline."""
    return type("TimedHttpProtocol", (TimedHttpProtocol,), {"request_timeout": request_timeout})
