"""The HTTP/1.1 connection the frontend's uvicorn runs: uvicorn's httptools protocol with a limit on
the request head (request line plus headers).

httptools (llhttp) buffers a request head of any size, so without a limit one client can make a
frontend hold megabytes of headers per connection. `HeadLimitedHttpToolsProtocol` counts the bytes
fed to the parser while a head is being read; past `max_head_bytes` it answers 431 in OpenAI's error
shape with `Connection: close` and stops parsing. It then half-closes (FIN) and reads and drops what
the client still sends, up to `DRAIN_LIMIT_BYTES` or `DRAIN_TIMEOUT_S`, before closing: closing a
socket that still has unread data sends a TCP reset, which many clients report instead of the
answer they were sent.

Counting is per chunk read from the socket, and a chunk in which a head or a message ends is not
counted, so a head is refused at most a chunk past the limit and a body is never counted as head.
Lifecycle: one instance per connection (uvicorn's); the state below is per connection.
"""

from __future__ import annotations

import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tidal.frontend.errors import request_header_too_large

logger = logging.getLogger(__name__)

DRAIN_LIMIT_BYTES = 16 << 20
"""After a 431, what the client still sends is read and dropped up to this much, then the connection closes."""
DRAIN_TIMEOUT_S = 5.0
"""After a 431 the connection closes this long after the answer at the latest."""


class HeadLimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol refusing request heads over `max_head_bytes` with 431."""

    def __init__(self, *args, max_head_bytes: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes = max_head_bytes
        self._head_bytes = 0  # fed since the last head or message ended
        self._in_body = False  # between a head's end and its message's end
        self._boundaries = 0  # heads and messages ended so far
        self._refused = False  # answered 431: everything read from now on is dropped
        self._drained_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._drain(data)
            return
        boundaries = self._boundaries
        super().data_received(data)
        if self._boundaries != boundaries or self.transport.is_closing():
            self._head_bytes = 0  # a head or a message ended in this chunk (or the connection did)
            return
        if not self._in_body:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse()

    def on_headers_complete(self) -> None:
        self._in_body = True
        self._boundaries += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._boundaries += 1
        super().on_message_complete()

    def _refuse(self) -> None:
        self._refused = True
        self._unset_keepalive_if_required()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined head while a response is under way: no room to answer
            return
        logger.warning("request head from %s over %d bytes: 431", self.client, self.max_head_bytes)
        self.transport.write(self._answer())
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(DRAIN_TIMEOUT_S, self.transport.close)

    def _answer(self) -> bytes:
        body = json.dumps(request_header_too_large(self.max_head_bytes).body()).encode()
        lines = [b"HTTP/1.1 431 Request Header Fields Too Large"]
        lines += [name + b": " + value for name, value in self.server_state.default_headers]
        lines += [b"content-type: application/json", b"content-length: " + str(len(body)).encode(),
                  b"connection: close"]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def _drain(self, data: bytes) -> None:
        self._drained_bytes += len(data)
        if self._drained_bytes > DRAIN_LIMIT_BYTES:
            self.transport.close()
