"""A TCP proxy that adds latency: the delay element of the namespace hosts
(:mod:`fleet.testing.hosts`), since this kernel has no netem.

    python -m fleet.testing.delay_proxy --delay-file PATH \\
        --listen 0.0.0.0:7379=127.0.0.1:6379 [--listen ...]

Each ``--listen ADDR:PORT=TARGET:PORT`` accepts connections and opens one to the target
for each. Every chunk read on one side is written to the other half the round-trip time
later (the one-way delay), in order, while later chunks are already read: a propagation
delay, not a bandwidth limit (the links' tbf does that). A connection's first bytes wait
one round trip more, as a real connection's handshake would make them. At most
``MAX_QUEUED`` chunks (of up to 64 KiB) wait per direction, as a TCP window would allow.

The round-trip time, in milliseconds, is the number in ``--delay-file``; on SIGHUP the
proxy reads it again and writes the value it applies to ``<delay-file>.applied``
(also once at start, when it listens).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import signal
import socket
from pathlib import Path

#: Bytes per read.
CHUNK_BYTES = 1 << 16
#: Chunks in flight per direction of a connection (16 MiB: a gigabit's bandwidth-delay
#: product at 130 ms).
MAX_QUEUED = 256


class Delay:
    """The round-trip time the proxy applies, from a file (milliseconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rtt_s = 0.0
        self.reload()

    def reload(self) -> None:
        rtt_ms = float(self.path.read_text().strip() or 0)
        self.rtt_s = rtt_ms / 1000
        applied = self.path.with_name(self.path.name + ".applied")
        tmp = applied.with_name(applied.name + ".tmp")
        tmp.write_text(f"{rtt_ms:g}\n")
        tmp.replace(applied)

    @property
    def one_way_s(self) -> float:
        return self.rtt_s / 2


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay, first_s: float
) -> None:
    """Copy ``reader`` to ``writer``, each chunk the one-way delay after it was read (the
    first ``first_s`` more); at the end, half-close ``writer``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(MAX_QUEUED)

    async def receive() -> None:
        extra_s = first_s
        while True:
            data = await reader.read(CHUNK_BYTES)
            await queue.put((loop.time() + delay.one_way_s + extra_s, data))
            extra_s = 0.0
            if not data:
                return

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait_s = due - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(receive(), deliver())


async def _serve(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: Delay,
) -> None:
    _no_delay(client_w)
    try:
        up_r, up_w = await asyncio.open_connection(*target)
    except OSError:  # the target is down: the client sees its connection closed
        client_w.close()
        return
    _no_delay(up_w)
    try:
        await asyncio.gather(
            _pipe(client_r, up_w, delay, first_s=delay.rtt_s),  # the handshake's round trip
            _pipe(up_r, client_w, delay, first_s=0.0),
        )
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for w in (up_w, client_w):
            w.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delay-file", type=Path, required=True)
    parser.add_argument("--listen", action="append", required=True, help="ADDR:PORT=TARGET:PORT")
    args = parser.parse_args()
    delay = Delay(args.delay_file)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, delay.reload)
    servers = []
    for spec in args.listen:
        listen, _, target = spec.partition("=")
        host, port = _address(listen)
        serve = functools.partial(_serve, target=_address(target), delay=delay)
        servers.append(await asyncio.start_server(serve, host, port, reuse_address=True))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
