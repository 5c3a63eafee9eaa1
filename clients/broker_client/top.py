"""`broker-cli top`, `connections` and `topics`: who lags, and which topics are busy.

They read the broker's admin JSON (`GET /connections`, `GET /topics`, docs/protocol.md), with the
`--token` as Bearer (an admin token when the broker has auth on). `top` is a live view in the
terminal, like `nats top`: rich draws it (`rich.live.Live`, redrawn in place every `--interval`)
and single keys switch the sort while it runs. Without a terminal (a pipe, a test) or with
`--once` it prints one frame and exits, so it can be tested and scripted.

Keys: `l` lag, `a` age, `d` dropped (connections); `r` rate, `s` subscribers (topics); `q` quit.
Columns: `fd` is the connection's socket, `lag` the age of the oldest frame queued to it, `confl`
the topics whose newest message is held for it (conflate policy), `up` how long it has been
connected; a row in bold red is over the high-water mark now.
The terminal is put in cbreak mode (keys arrive unbuffered, no echo) and restored on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .errors import BadRequestError, BrokerError, ConnectError, ForbiddenError, UnauthorizedError

__all__ = [
    "CONNECTION_SORTS",
    "TOPIC_SORTS",
    "View",
    "connections_table",
    "fetch_json",
    "render",
    "run_top",
    "topics_table",
]

CONNECTION_SORTS = ("lag", "age", "dropped")
TOPIC_SORTS = ("rate", "subscribers")
KEYS = {"l": "lag", "a": "age", "d": "dropped", "r": "rate", "s": "subscribers"}
WIDE = 100  # columns for output that is not a terminal
HELP = "l lag  a age  d dropped  |  r rate  s subscribers  |  q quit"


def fetch_json(
    base: str,
    path: str,
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
) -> Any:
    """GET {base}{path} as JSON. 401/403 raise UnauthorizedError/ForbiddenError, 400
    BadRequestError, anything else that fails ConnectError with a readable reason."""
    url = base + path
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            detail = _error_text(exc.read())
        cls: type[BrokerError] | None = {
            400: BadRequestError,
            401: UnauthorizedError,
            403: ForbiddenError,
        }.get(exc.code)
        if cls is not None:
            hint = " (an admin token: --token)" if exc.code in (401, 403) else ""
            message = f"{url} answered HTTP {exc.code}: {detail}{hint}"
            raise cls(cls.CODE or "error", message, status=exc.code) from None
        raise ConnectError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            reason = "connection refused (is the broker running?)"
        raise ConnectError(f"cannot reach {url}: {reason}") from None
    except (TimeoutError, OSError) as exc:
        raise ConnectError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise ConnectError(f"{url} did not answer JSON (is it a broker?)") from None


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:200]


# -- formatting --------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _duration(s: float) -> str:
    if s <= 0:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _table(title: str) -> Table:
    return Table(
        title=title or None,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        expand=True,
    )


def connections_table(data: dict[str, Any], title: str = "") -> Table:
    """Connections as rows; one over the high-water mark (`slow`) in bold red. With `--workers`
    the fd column reads worker/fd (fds and ids are per worker)."""
    table = _table(title)
    for name, justify, width in (
        ("fd", "right", 5),
        ("remote", "left", 9),
        ("user", "left", 4),
        ("subs", "right", 4),
        ("queued", "right", 9),
        ("frames", "right", 6),
        ("lag", "right", 7),  # the oldest queued frame's age
        ("dropped", "right", 7),
        ("confl", "right", 5),  # topics held conflated
        ("up", "right", 6),  # connected for
    ):
        table.add_column(name, justify=justify, no_wrap=True, min_width=width)  # type: ignore[arg-type]
    for c in data.get("connections", []):
        fd = str(c.get("fd", c["id"]))
        table.add_row(
            fd if c.get("worker") is None else f"{c['worker']}/{fd}",
            str(c["remote"]),
            str(c.get("user") or "-"),
            str(c["subscriptions"]),
            _bytes(c["queued_bytes"]),
            str(c["queued_frames"]),
            _duration(c["queue_age_s"]),
            f"{c['dropped']:,}",
            str(c.get("conflated_topics", 0) or "-"),
            _duration(c["connected_s"]),
            style="bold red" if c.get("slow") else None,
        )
    return table


def topics_table(data: dict[str, Any], title: str = "") -> Table:
    table = _table(title)
    table.add_column("topic", no_wrap=True, overflow="ellipsis", ratio=3)
    table.add_column("msgs/s", justify="right", no_wrap=True, ratio=1)
    table.add_column("subscribers", justify="right", no_wrap=True, ratio=1)
    for t in data.get("topics", []):
        table.add_row(str(t["topic"]), f"{t['rate']:,.1f}", f"{t['subscribers']:,}")
    return table


@dataclass
class View:
    """What `top` shows: the two sorts and how many rows of each."""

    sort: str = "lag"
    topic_sort: str = "rate"
    limit: int = 15

    def press(self, key: str) -> bool:
        """Apply a key; False when it means quit."""
        if key in ("q", "Q", "\x03", "\x04"):
            return False
        chosen = KEYS.get(key.lower())
        if chosen in CONNECTION_SORTS:
            self.sort = chosen
        elif chosen in TOPIC_SORTS:
            self.topic_sort = chosen
        return True


Fetch = Callable[[str], Any]


def render(fetch: Fetch, view: View, base: str) -> Group:
    """One frame of `top`: a header line, the connections and the topics."""
    conns = fetch(f"/connections?sort={view.sort}&limit={view.limit}")
    topics = fetch(f"/topics?sort={view.topic_sort}&limit={view.limit}")
    header = Text.assemble(
        ("broker top ", "bold"),
        f"{base}  {time.strftime('%H:%M:%S')}  ",
        (f"{conns.get('total', 0):,} connections", "bold"),
        "  sort: ",
        (view.sort, "bold cyan"),
        " / ",
        (view.topic_sort, "bold cyan"),
    )
    shown = len(conns.get("connections", []))
    return Group(
        header,
        Text(HELP, style="dim"),
        connections_table(conns, f"Connections by {view.sort} ({shown} shown)"),
        topics_table(topics, f"Topics by {view.topic_sort} (per second, last second)"),
    )


@contextlib.contextmanager
def _cbreak(stream: TextIO) -> Iterator[None]:
    """Keys unbuffered and unechoed while the view runs; the terminal restored after."""
    import termios
    import tty

    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _keys(fd: int, timeout: float) -> str:
    """The keys typed within `timeout` seconds ("" if none)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return ""
    return os.read(fd, 64).decode("utf-8", "replace")


def run_top(
    fetch: Fetch,
    base: str,
    view: View,
    interval: float = 1.0,
    once: bool = False,
    console: Console | None = None,
    stdin: TextIO | None = None,
) -> None:
    """The live view until `q` (or Ctrl-C); one frame when `once` or not on a terminal."""
    console = console or Console()
    stdin = stdin or sys.stdin
    interactive = not once and console.is_terminal and stdin.isatty()
    if not interactive:
        # A pipe gets 80 columns from rich; the table needs about 100 to show every column.
        console.print(render(fetch, view, base), width=max(console.width, WIDE), crop=False)
        return
    with _cbreak(stdin), Live(console=console, screen=True, auto_refresh=False) as live:
        fd = stdin.fileno()
        while True:
            live.update(render(fetch, view, base), refresh=True)
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                typed = _keys(fd, left)
                if not typed:
                    continue
                for key in typed:
                    if not view.press(key):
                        return
                break  # a key: redraw now with the new sort
