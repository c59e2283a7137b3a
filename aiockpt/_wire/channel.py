"""asyncio streams <-> protocol messages: the thin IO glue over ``aiockpt._wire.protocol``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

from aiockpt._wire.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    MessageCodec,
    WorkerRequest,
    WorkerResponse,
)
from aiockpt.errors import ProtocolError

__all__ = ["Channel"]

_READ_CHUNK = 256 * 1024
#: how long ``aclose`` lets buffered frames drain before aborting the connection
_CLOSE_TIMEOUT_S = 1.0


class Channel:
    """One end of the parent <-> worker socketpair, speaking whole messages.

    ``send`` may be called from several tasks at once: each frame is handed to the transport in
    one ``write`` call, so frames never interleave.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(max_frame_size)
        self.codec = MessageCodec()
        #: True once this side closed the channel (``aclose``)
        self.closed = False

    @classmethod
    async def open(
        cls, sock: socket.socket, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    ) -> Channel:
        """Wrap a connected stream socket (one end of a socketpair)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_READ_CHUNK)
        return cls(reader, writer, max_frame_size=max_frame_size)

    async def send(self, message: WorkerRequest | WorkerResponse) -> None:
        """Send one message. Raises ``ConnectionError`` if the peer has gone."""
        if self._writer.is_closing():
            # Once the transport has closed (the peer reset the connection, or aclose ran),
            # asyncio's drops writes silently and uvloop's raises RuntimeError: make both the
            # ConnectionError that callers handle as "the peer has gone".
            raise ConnectionResetError("the channel to the peer is closed")
        self._writer.write(self.codec.encode(message))
        await self._writer.drain()

    async def frames(self) -> AsyncIterator[bytes]:
        """Yield frame bodies until the peer closes its end.

        Raises ``ProtocolError`` for an oversize frame or a stream that ends mid-frame.
        """
        while True:
            chunk = await self._reader.read(_READ_CHUNK)
            if not chunk:
                if self._decoder.buffered:
                    raise ProtocolError(
                        f"the stream ended inside a frame ({self._decoder.buffered} bytes "
                        "of an incomplete frame)"
                    )
                return
            for body in self._decoder.feed(chunk):
                yield body

    async def aclose(self) -> None:
        """Close our end; the peer's reads see EOF. Frames still buffered get ``_CLOSE_TIMEOUT_S``
        seconds to go out (a peer that reads nothing, stopped say, would hold a graceful
        close forever); then the connection is aborted."""
        self.closed = True
        self._writer.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self._writer.wait_closed()
        except TimeoutError:
            self._writer.transport.abort()
        except (ConnectionError, OSError):
            pass
