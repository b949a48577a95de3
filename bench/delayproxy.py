"""A TCP proxy that adds a fixed delay to every round trip.

    python bench/delayproxy.py --target 127.0.0.1:5433 --delay 0.005 [--port 0]

Prints the port it listens on, then forwards every connection to *target*.
Bytes from the server reach the client *delay* seconds after they arrived
(order kept, no throttling), so each request/response round trip takes
*delay* longer: a replica in a farther zone. Run it in its own process (the
benches do) so that its CPU does not share the client's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _delayed_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((0.0, b""))
        await sender
    finally:
        sender.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def serve(target_host: str, target_port: int, delay: float, port: int) -> None:
    async def handle(client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host,
                                                                         target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer),
                             _delayed_pipe(server_reader, client_writer, delay),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


class DelayProxy:
    """Runs this module in a child process: ``with DelayProxy(host, port, 0.005) as p: p.port``."""

    def __init__(self, host: str, port: int, delay: float) -> None:
        self._args = [sys.executable, __file__, "--target", f"{host}:{port}",
                      "--delay", str(delay)]
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> DelayProxy:
        self._process = subprocess.Popen(self._args, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip():
            raise RuntimeError("the delay proxy did not start")
        self.port = int(line)
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--delay", type=float, default=0.005, help="seconds per round trip")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, int(port), args.delay, args.port))


if __name__ == "__main__":
    main()
