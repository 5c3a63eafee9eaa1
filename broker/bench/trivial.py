"""The trivial server: just enough of protocol v1 to show the load generator's own ceiling.

It accepts the upgrade on any path, answers `subscribe` with an ack, and for each `publish`
builds the delivery frame once; the frames published during one loop iteration are joined
and written to every subscriber of the topic with one `send` each (leftovers queue and arm
EPOLLOUT). That makes it much cheaper per delivery than any real broker, so a `ceiling` run
against it measures how many deliveries per second the generator can count. No limits, no
timers, no pings, no wildcards, no validation beyond what parsing needs: never a real server.

usage: python -m broker.bench.trivial --port P   (binds 127.0.0.1 only; SIGTERM exits 0)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import select
import signal
import socket
import struct
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_QUEUE = 64 << 20  # a subscriber this far behind is dropped (the run then reports loss)
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
_LEN16 = struct.Struct("!BBH")


def server_frame(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 0x10000:
        return _LEN16.pack(0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def unmask(key: bytes, data: bytes) -> bytes:
    n = len(data)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ k).to_bytes(n, "little")


class Client:
    __slots__ = ("fd", "inbuf", "outq", "sock", "topics", "ws")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = b""
        self.outq = bytearray()
        self.ws = False
        self.topics: list[str] = []


class Trivial:
    def __init__(self, port: int) -> None:
        self.ep = select.epoll()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.ep.register(self.lsock.fileno(), EPOLLIN)
        self.clients: dict[int, Client] = {}
        self.topics: dict[str, dict[int, Client]] = {}
        self.seq: dict[str, int] = {}
        self.pending: dict[str, list[bytes]] = {}
        self.running = True

    def close(self, c: Client) -> None:
        if self.clients.pop(c.fd, None) is None:
            return
        for t in c.topics:
            subs = self.topics.get(t)
            if subs is not None:
                subs.pop(c.fd, None)
        with contextlib.suppress(OSError):
            self.ep.unregister(c.fd)
        c.sock.close()

    def send(self, c: Client, data: bytes) -> None:
        if c.outq:
            if len(c.outq) > MAX_QUEUE:
                self.close(c)
            else:
                c.outq += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.close(c)
            return
        if n < len(data):
            c.outq += data[n:]
            self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)

    def on_text(self, c: Client, text: bytes) -> None:
        try:
            msg: Any = json.loads(text)
            op = msg["op"]
        except (ValueError, KeyError, TypeError):
            return
        if op == "subscribe":
            topic = str(msg["topic"])
            self.topics.setdefault(topic, {})[c.fd] = c
            c.topics.append(topic)
            ack: dict[str, Any] = {"op": "ack", "id": msg.get("id")}
            self.send(c, server_frame(json.dumps(ack, separators=(",", ":")).encode()))
        elif op == "publish":
            topic = str(msg["topic"])
            n = self.seq.get(topic, 0) + 1
            self.seq[topic] = n
            out = {"op": "message", "topic": topic, "data": msg.get("data"), "seq": n}
            # encoded once; joined with this iteration's other publishes in flush()
            frame = server_frame(json.dumps(out, separators=(",", ":")).encode())
            self.pending.setdefault(topic, []).append(frame)

    def on_frames(self, c: Client) -> bool:
        buf = c.inbuf
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            ln, hl = b1 & 127, 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln, hl = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, hl = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:
                hl += 4
            if n - pos < hl + ln:
                break
            data = buf[pos + hl : pos + hl + ln]
            if b1 & 0x80:
                data = unmask(buf[pos + hl - 4 : pos + hl], data)
            op = b0 & 15
            pos += hl + ln
            if op == 8:
                return False
            if op == 9:
                self.send(c, server_frame(data, 10))
            elif op == 1:
                self.on_text(c, data)
        c.inbuf = buf[pos:]
        return True

    def handshake(self, c: Client) -> bool:
        end = c.inbuf.find(b"\r\n\r\n")
        if end < 0:
            return len(c.inbuf) < 16384
        key = proto = None
        for line in c.inbuf[:end].split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            name = k.strip().lower()
            if name == b"sec-websocket-key":
                key = v.strip()
            elif name == b"sec-websocket-protocol":
                proto = v.split(b",")[0].strip()
        if key is None:
            return False
        acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
        extra = b"Sec-WebSocket-Protocol: " + proto + b"\r\n" if proto else b""
        c.inbuf = c.inbuf[end + 4 :]
        c.ws = True
        self.send(
            c,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + acc + b"\r\n" + extra + b"\r\n",
        )
        return True

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for topic, frames in pending.items():
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            for c in list(self.topics.get(topic, {}).values()):
                self.send(c, data)

    def accept(self) -> None:
        for _ in range(256):
            try:
                s, _addr = self.lsock.accept()
            except BlockingIOError:
                return
            except OSError:
                return  # EMFILE and friends: try again on the next wake-up
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Client(s)
            self.clients[c.fd] = c
            self.ep.register(c.fd, EPOLLIN)

    def on_event(self, fd: int, ev: int) -> None:
        c = self.clients.get(fd)
        if c is None:
            return
        if ev & EPOLLOUT and c.outq:
            try:
                n = c.sock.send(c.outq)
            except BlockingIOError:
                n = 0
            except OSError:
                self.close(c)
                return
            del c.outq[:n]
            if not c.outq:
                self.ep.modify(fd, EPOLLIN)
        if ev & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            try:
                data = c.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close(c)
                return
            c.inbuf = c.inbuf + data if c.inbuf else data
            ok = self.handshake(c) if not c.ws else True
            if ok and c.ws:
                ok = self.on_frames(c)
            if not ok:
                self.close(c)

    def run(self) -> None:
        lfd = self.lsock.fileno()
        while self.running:
            try:
                events = self.ep.poll(1.0)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == lfd:
                    self.accept()
                else:
                    self.on_event(fd, ev)
            if self.pending:
                self.flush()
        for c in list(self.clients.values()):
            self.close(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    server = Trivial(args.port)

    def stop(_signum: int, _frame: object) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.run()


if __name__ == "__main__":
    main()
