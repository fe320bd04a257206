#!/usr/bin/env python3
"""Opens N keep-alive client connections to a proxy on 127.0.0.1, sends one GET
on each, reads the answer, and holds them all open; then prints the resident
memory of the given processes (summed) before and after, in KiB.

usage: idle_conns.py PORT N PID [PID...]
Stops by itself after measuring; every socket is closed on exit.
"""
import asyncio
import sys
import time


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


async def open_one(port, held):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: bench.local\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if length:
        await asyncio.wait_for(reader.readexactly(length), 10)
    held.append(writer)


async def main():
    port, count, pids = int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
    before = rss_kib(pids)
    held = []
    started = time.monotonic()
    batch = 500
    for first in range(0, count, batch):
        await asyncio.gather(*(open_one(port, held) for _ in range(first, min(count, first + batch))))
    await asyncio.sleep(1)
    after = rss_kib(pids)
    print(f"{len(held)} {before} {after} {time.monotonic() - started:.1f}")
    for writer in held:
        writer.close()


asyncio.run(main())
