#!/usr/bin/env python3
"""Opens N keep-alive client connections to a proxy on 127.0.0.1, sends one GET
on each, reads the answer, and holds them all open; then closes them all.
Prints the resident memory of the given processes (VmRSS summed, KiB):

    held before idle after_close seconds

held: clients answered (2xx) and still open; before: RSS before the first
connection; idle: 1 s after the last answer, all clients held; after_close:
--settle seconds after every socket was closed; seconds: from the first
connection to the last answer.

usage: idle_conns.py [--mode gentle|wave|burst] [--settle S] [--timeout S] [--deadline S]
                     [--protocol http1|tls|h2] PORT N PID [PID...]

  --protocol tls  HTTPS (HTTP/1.1 over TLS, certificate not checked)
  --protocol h2   HTTP/2 over TLS (ALPN h2): the client preface and SETTINGS are
                  sent and the server's SETTINGS read, instead of a GET; then held

  gentle  batches of 500 clients, each connects, asks and reads; answers read at once
  wave    clients one after another (at most 8 in progress at once): connect,
          ask, read the whole answer, keep the socket open
  burst   all N connect first (in batches of 500, no request yet), then all send
          their request at once, then all answers are read

Before opening anything it checks the open-file limits: its own (raised to the
hard limit if needed) and the soft limit of the given processes from
/proc/PID/limits (the largest among them, as only some of a process tree hold
connections): gentle needs N + min(N, 500) + 64, wave and burst about 2 x N + 64
(client side + backend side). Too low: a message on stderr and exit 2.
Failures (connect errors, timeouts, non-2xx answers, broken answers, clients
closed by the other side) are counted and printed on stderr. Every await is
bounded by --timeout (10 s), and no client starts after --deadline (120 s): a
proxy that stops answering costs seconds, not hours. Every socket is closed on
exit.
"""
import argparse
import asyncio
import resource
import ssl
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.local\r\n\r\n"
BATCH = 500          # gentle batches; burst's connect batches (within a listen backlog of 511)
WAVE_IN_FLIGHT = 8   # clients in progress at once in a wave
MARGIN = 64          # descriptors besides the clients': listeners, epoll, logs, stdio


class Failure(Exception):
    """A client that did not end up answered and held; `kind` names why."""

    def __init__(self, kind):
        super().__init__(kind)
        self.kind = kind


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def soft_nofile(pid):
    """The soft "Max open files" of a process, None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/limits") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    soft = line[len("Max open files"):].split()[0]
                    return float("inf") if soft == "unlimited" else int(soft)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return None


def check_limits(mode, count, pids):
    """Exits with 2 and a message when either side may not open enough descriptors."""
    own_need = count + MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < own_need:
        target = own_need if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < own_need:
        print(f"idle_conns.py: {count} clients need {own_need} open files in this process, "
              f"but its limit is {soft} (hard {hard}): raise the hard limit "
              f"(ulimit -Hn, as root) or lower N", file=sys.stderr)
        sys.exit(2)

    proxy_need = 2 * count + MARGIN if mode in ("wave", "burst") else count + min(count, BATCH) + MARGIN
    limits = {pid: soft_nofile(pid) for pid in pids}
    known = [limit for limit in limits.values() if limit is not None]
    if not known:
        print(f"idle_conns.py: cannot read /proc/PID/limits of {' '.join(map(str, pids))}: "
              f"are they running?", file=sys.stderr)
        sys.exit(2)
    if max(known) < proxy_need:
        shown = ", ".join(f"{pid}: {limit}" for pid, limit in limits.items())
        print(f"idle_conns.py: {mode} with {count} clients needs about {proxy_need} open files "
              f"in the proxy ({'2 x N, client side + backend side' if mode != 'gentle' else 'N + a batch'}"
              f" + {MARGIN}), but its soft limit is lower ({shown}): start it with a higher "
              f"ulimit -n or lower N", file=sys.stderr)
        sys.exit(2)


async def timed(awaitable, timeout):
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise Failure("timeout") from None


PROTOCOL = "http1"   # set from --protocol
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"       # an empty SETTINGS frame
H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def tls_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"] if PROTOCOL == "h2" else ["http/1.1"])
    return context


async def connect(port, timeout):
    try:
        if PROTOCOL == "http1":
            return await timed(asyncio.open_connection("127.0.0.1", port), timeout)
        return await timed(
            asyncio.open_connection("127.0.0.1", port, ssl=tls_context(), server_hostname="bench.local"), timeout)
    except (OSError, ssl.SSLError):
        raise Failure("connect") from None


async def send(writer, timeout):
    writer.write(H2_PREFACE + H2_SETTINGS if PROTOCOL == "h2" else REQUEST)
    await timed(writer.drain(), timeout)


async def read_answer(reader, timeout):
    """Reads one whole answer (Content-Length or chunked); fails unless 2xx and kept alive.
    Over HTTP/2: the server's SETTINGS frame, acknowledged."""
    if PROTOCOL == "h2":
        try:
            header = await timed(reader.readexactly(9), timeout)
            if header[3] != 0x04:
                raise Failure("no SETTINGS first")
            await timed(reader.readexactly(int.from_bytes(header[:3], "big")), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise Failure("closed by peer") from None
        return
    try:
        head = await timed(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.split(b"\r\n")
        status_line = lines[0].split()
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise Failure("broken answer")
        status = int(status_line[1])
        length, chunked, close = None, False, status_line[0] == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.endswith(b"chunked")
            elif name == b"connection":
                tokens = [token.strip() for token in value.split(b",")]
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens:
                    close = False
        if chunked:
            while True:
                size_line = await timed(reader.readuntil(b"\r\n"), timeout)
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while await timed(reader.readuntil(b"\r\n"), timeout) != b"\r\n":
                        pass  # trailer fields
                    break
                await timed(reader.readexactly(size + 2), timeout)
        elif length is not None:
            if length:
                await timed(reader.readexactly(length), timeout)
        elif not (100 <= status < 200 or status in (204, 304)):
            raise Failure("no length (read to close)")
    except (asyncio.IncompleteReadError, ConnectionError):
        raise Failure("closed by peer") from None
    except (asyncio.LimitOverrunError, ValueError, IndexError):
        raise Failure("broken answer") from None
    if not 200 <= status < 300:
        raise Failure(f"status {status}")
    if close:
        raise Failure("not kept alive")


class Clients:
    def __init__(self, port, timeout, deadline):
        self.port, self.timeout = port, timeout
        self.deadline = time.monotonic() + deadline
        self.held = []        # (reader, writer) answered and open
        self.open = []        # every writer ever opened, to close on exit
        self.failures = {}

    def fail(self, kind):
        self.failures[kind] = self.failures.get(kind, 0) + 1

    async def connect(self):
        if time.monotonic() > self.deadline:
            raise Failure("not started (deadline)")
        reader, writer = await connect(self.port, self.timeout)
        self.open.append(writer)
        return reader, writer

    async def one(self):
        """Connect, ask, read, hold (gentle and wave)."""
        try:
            reader, writer = await self.connect()
            await send(writer, self.timeout)
            await read_answer(reader, self.timeout)
            if PROTOCOL == "h2":
                writer.write(H2_SETTINGS_ACK)
            self.held.append((reader, writer))
        except Failure as failure:
            self.fail(failure.kind)
        except OSError:
            self.fail("connect")

    async def gentle(self, count):
        for first in range(0, count, BATCH):
            await asyncio.gather(*(self.one() for _ in range(first, min(count, first + BATCH))))

    async def wave(self, count):
        remaining = count

        async def worker():
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await self.one()

        await asyncio.gather(*(worker() for _ in range(min(WAVE_IN_FLIGHT, count))))

    async def burst(self, count):
        connected = []

        async def connect_one():
            try:
                connected.append(await self.connect())
            except Failure as failure:
                self.fail(failure.kind)
            except OSError:
                self.fail("connect")

        for first in range(0, count, BATCH):
            await asyncio.gather(*(connect_one() for _ in range(first, min(count, first + BATCH))))

        async def send_one(client):
            try:
                await send(client[1], self.timeout)
                return client
            except Failure as failure:
                self.fail(failure.kind)
            except OSError:
                self.fail("closed by peer")
            return None

        sent = [c for c in await asyncio.gather(*(send_one(c) for c in connected)) if c]

        async def read_one(client):
            try:
                await read_answer(client[0], self.timeout)
                self.held.append(client)
            except Failure as failure:
                self.fail(failure.kind)

        await asyncio.gather(*(read_one(c) for c in sent))

    async def close_all(self):
        for writer in self.open:
            writer.close()
        waits = [writer.wait_closed() for writer in self.open]
        self.open = []
        try:
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), self.timeout)
        except asyncio.TimeoutError:
            pass


async def run(args):
    clients = Clients(args.port, args.timeout, args.deadline)
    try:
        before = rss_kib(args.pids)
        started = time.monotonic()
        await getattr(clients, args.mode)(args.count)
        elapsed = time.monotonic() - started
        await asyncio.sleep(1)
        idle = rss_kib(args.pids)
        still_open = [c for c in clients.held if not c[0].at_eof()]
        for _ in range(len(clients.held) - len(still_open)):
            clients.fail("closed by peer while held")
        await clients.close_all()
        await asyncio.sleep(args.settle)
        after_close = rss_kib(args.pids)
    finally:
        await clients.close_all()
    if clients.failures:
        detail = ", ".join(f"{kind} {n}" for kind, n in sorted(clients.failures.items()))
        print(f"idle_conns.py: {args.mode}, port {args.port}: {sum(clients.failures.values())} "
              f"of {args.count} clients failed ({detail})", file=sys.stderr)
    print(f"{len(still_open)} {before} {idle} {after_close} {elapsed:.1f}")


def main():
    parser = argparse.ArgumentParser(
        description="Hold N idle keep-alive clients on a proxy and print its RSS.",
        usage="%(prog)s [--mode gentle|wave|burst] [--settle S] [--timeout S] [--deadline S] "
              "[--protocol http1|tls|h2] PORT N PID [PID...]")
    parser.add_argument("--mode", choices=("gentle", "wave", "burst"), default="gentle")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds between closing every client and the last measure (5)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="bound on every connect, send and read, seconds (10)")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="no client starts later than this after the first, seconds (120)")
    parser.add_argument("--protocol", choices=("http1", "tls", "h2"), default="http1")
    parser.add_argument("port", type=int, metavar="PORT")
    parser.add_argument("count", type=int, metavar="N")
    parser.add_argument("pids", type=int, nargs="+", metavar="PID")
    args = parser.parse_args()
    if args.count < 1:
        parser.error("N must be at least 1")
    global PROTOCOL
    PROTOCOL = args.protocol
    check_limits(args.mode, args.count, args.pids)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
