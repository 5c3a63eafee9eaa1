"""Where the memory of an idle TLS connection goes: OpenSSL heap per server-side SSLObject.

    .venv/bin/python scripts/tls_memory.py [N]

Makes N server SSLObjects over memory BIOs from the broker's own context (broker/net/tls.py),
completes a TLS 1.3 handshake for each against an in-process client, passes one small message
each way, drops the clients, and reports glibc's in-use heap (mallinfo2) per server connection.
Variants show what does not change it: session tickets, the session cache. It also prints the
SSL_CTX mode that CPython set (read with ctypes, the context pointer sits right after the object
header): 0x10 is SSL_MODE_RELEASE_BUFFERS. Linux with glibc only; a measurement, not a test.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ssl
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.bench.tls import client_context, self_signed
from broker.net.tls import server_context

SSL_CTRL_MODE = 33
SSL_CTRL_SET_SESS_CACHE_MODE = 44


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2
_libssl = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # resolves libssl symbols
_libssl.SSL_CTX_ctrl.restype = ctypes.c_long
_libssl.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]


def heap() -> int:
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def ctx_ctrl(ctx: ssl.SSLContext, cmd: int, arg: int) -> int:
    pointer = ctypes.c_void_p.from_address(id(ctx) + 16).value  # PyObject_HEAD, then SSL_CTX *
    return int(_libssl.SSL_CTX_ctrl(pointer, cmd, arg, None))


def per_connection(cert: Path, key: Path, n: int, handshake: bool, **variant: int) -> float:
    ctx = server_context(str(cert), str(key))
    if "tickets" in variant:
        ctx.num_tickets = variant["tickets"]
    if variant.get("no_cache"):
        ctx_ctrl(ctx, SSL_CTRL_SET_SESS_CACHE_MODE, 0)
    client_ctx = client_context()
    gc.collect()
    before = heap()
    servers, clients = [], []
    for _ in range(n):
        s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = ctx.wrap_bio(s_in, s_out, server_side=True)
        servers.append((server, s_in, s_out))
        if not handshake:
            continue
        c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
        for _ in range(4):
            for end in (client, server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        client.write(b"x" * 200)
        s_in.write(c_out.read())
        server.read(65536)
        server.write(b"y" * 200)
        c_in.write(s_out.read())
        client.read(65536)
        clients.append((client, c_in, c_out))
    assert not handshake or servers[0][0].version() == "TLSv1.3"
    del clients
    gc.collect()
    return (heap() - before) / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = self_signed(Path(tmp))
        mode = ctx_ctrl(server_context(str(cert), str(key)), SSL_CTRL_MODE, 0)
        print(f"{ssl.OPENSSL_VERSION}; SSL_CTX mode set by CPython: {mode:#x}")
        rows = [
            ("wrap_bio only, no handshake", False, {}),
            ("handshake done, one message each way", True, {}),
            ("  the same with num_tickets = 0", True, {"tickets": 0}),
            ("  the same with the session cache off", True, {"no_cache": 1}),
        ]
        for label, handshake, variant in rows:
            size = per_connection(cert, key, n, handshake, **variant)
            print(f"{label:40s} {size:8.0f} B of heap per server connection")


if __name__ == "__main__":
    main()
