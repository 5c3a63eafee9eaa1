"""`broker-cli`: publish, subscribe, read history, ping, read stats, watch lag (`top`,
`connections`, `topics`) and mint development tokens from a terminal or a shell script.

Built on `AsyncClient` and argparse. Expected failures (broker unreachable, an error reply, bad
input) print one line `broker-cli: error: ...` on stderr and exit with a code a script can test;
only a bug shows a traceback. Results go to stdout, progress and connection news to stderr, so
`broker-cli subscribe t | jq .data` sees nothing but messages.

Exit codes: 0 success; 1 the broker answered with an error (including a refused token: HTTP 401 or
403 at the handshake, `unauthorized`, `forbidden`); 2 bad usage or input; 3 the broker could not be
reached or the connection was lost (also a token that expired, close 4001); 130 interrupted
(publish, ping).

Every command takes `--token` (default `$BROKER_TOKEN`), sent as `Authorization: Bearer`, and
`--cafile` for a `wss://` broker whose certificate a private CA signed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import inspect
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from .aio import AsyncClient
from .errors import BrokerClientError, BrokerConnectionError, BrokerError, RequestTimeoutError
from .protocol import (
    DEFAULT_URL,
    ConnectionState,
    Message,
    Position,
    StateChange,
    is_concrete,
    parse_position,
)
from .session import Unrecovered
from .stats import fetch_metrics, http_base, render_table, summary
from .top import CONNECTION_SORTS, TOPIC_SORTS, WIDE, View, connections_table, fetch_json, run_top
from .top import topics_table as _topics_table

__all__ = ["main"]

EXIT_OK = 0
EXIT_BROKER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

PROG = "broker-cli"


class UsageError(Exception):
    """Bad input from the user: exit 2 with the message."""


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# publish


def _read_messages(args: argparse.Namespace, stdin: TextIO) -> list[Any]:
    if args.data is not None and args.data != "-":
        texts = [args.data]
    elif args.lines:
        texts = [line.rstrip("\r\n") for line in stdin]
        texts = [t for t in texts if t.strip()]
    else:
        whole = stdin.read()
        texts = [whole[:-1] if whole.endswith("\n") else whole] if whole else []
    if args.raw:
        return texts
    messages = []
    for n, text in enumerate(texts, 1):
        try:
            messages.append(json.loads(text))
        except ValueError as exc:
            where = f"line {n}: " if args.lines else ""
            raise UsageError(
                f"{where}DATA is not valid JSON ({exc}); pass --raw to send it as a string"
            ) from None
    return messages


async def _publish(args: argparse.Namespace) -> int:
    messages = _read_messages(args, sys.stdin)
    if not messages:
        raise UsageError("nothing to publish (no DATA and empty stdin)")
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.rate is not None and args.rate <= 0:
        raise UsageError("--rate must be positive")
    total = len(messages) * args.count
    async with _client(args) as client:
        delivered = 0
        window = asyncio.Semaphore(args.window)
        failures: list[BaseException] = []

        async def one(data: Any) -> None:
            nonlocal delivered
            try:
                count = await client.publish(args.topic, data, ack=not args.no_ack)
                delivered += count or 0
            except BrokerClientError as exc:
                failures.append(exc)
            finally:
                window.release()

        start = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        for i in range(total):
            if failures:
                break
            if args.rate is not None:
                await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
            await window.acquire()
            task = asyncio.create_task(one(messages[i % len(messages)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        if failures:
            raise failures[0]
        if args.no_ack:
            await client.ping()  # the broker answers in order: everything before it was handled
        elapsed = time.monotonic() - start
    if total == 1 and not args.no_ack:
        print(delivered, flush=True)
        return EXIT_OK
    rate = total / elapsed if elapsed > 0 else float("inf")
    if args.no_ack:
        _err(f"published {total} messages in {elapsed:.2f} s ({rate:,.0f}/s), not acknowledged")
    else:
        print(delivered, flush=True)
        _err(
            f"published {total} messages in {elapsed:.2f} s ({rate:,.0f}/s), delivered {delivered}"
        )
    return EXIT_OK


# subscribe


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return repr(value)


def message_line(message: Message, epoch: str | None = None) -> str:
    """One output line: {"topic","seq","data"} ("epoch" too when given); bytes as base64 with
    "encoding":"base64" added."""
    record: dict[str, Any] = {"topic": message.topic, "seq": message.seq}
    if epoch is not None:
        record["epoch"] = epoch
    record["data"] = message.data
    if isinstance(message.data, bytes):
        record["data"] = base64.b64encode(message.data).decode("ascii")
        record["encoding"] = "base64"
    return json.dumps(record, ensure_ascii=False, default=_json_default)


def _since(args: argparse.Namespace) -> Position | None:
    if args.since is None:
        return None
    try:
        return parse_position(args.since)
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from None


async def _subscribe(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    since = _since(args)
    if since is not None and (len(args.topics) != 1 or not is_concrete(args.topics[0])):
        raise UsageError("--since needs exactly one concrete TOPIC (positions are per topic)")
    done = asyncio.Event()
    printed = 0
    last: Message | None = None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)

    def on_message(message: Message) -> None:
        nonlocal printed, last
        # Overlapping patterns ("a.*" and "a.b") hand the same delivery to each: print it once.
        if message is last or done.is_set():
            return
        last = message
        epoch = None
        if args.show_seq:
            position = client.position(message.topic)
            epoch = position.epoch if position is not None else None
        try:
            sys.stdout.write(message_line(message, epoch) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # `broker-cli subscribe t | head -1`: the reader is gone; stop quietly, and point stdout
            # at /dev/null so the interpreter's final flush does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            done.set()
            return
        printed += 1
        if args.count is not None and printed >= args.count:
            done.set()

    client = _client(args, report_states=True)
    try:
        async with client:
            for topic in args.topics:
                await client.subscribe(topic, on_message, since=since)
            _err(f"subscribed to {', '.join(args.topics)} at {args.url}")
            if args.show_seq:
                for topic in args.topics:
                    position = client.position(topic)
                    if position is not None:
                        _err(f"{topic} at {position}")
            closed = asyncio.create_task(client.wait_for_state(ConnectionState.CLOSED))
            stop = asyncio.create_task(done.wait())
            await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
            for task in (closed, stop):
                task.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(BrokenPipeError, ValueError):
            sys.stdout.flush()
    return EXIT_OK


# history


async def _history(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    since = _since(args)
    async with _client(args) as client:
        history = await client.history(args.topic, since=since, limit=args.limit)
    for message in history.messages:
        print(message_line(message, history.position.epoch), flush=True)
    complete = "complete" if history.recovered else "not complete (older messages are gone)"
    _err(f"{args.topic} at {history.position}; {len(history.messages)} messages, {complete}")
    return EXIT_OK


# token


def _token(args: argparse.Namespace) -> int:
    import jwt  # PyJWT: only this development command signs tokens

    if args.ttl <= 0:
        raise UsageError("--ttl must be positive")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": args.sub,
        "iat": now,
        "exp": now + args.ttl,
        "publish": args.publish,
        "subscribe": args.subscribe,
    }
    if args.admin:
        claims["admin"] = True
    if args.aud:
        claims["aud"] = args.aud
    if args.iss:
        claims["iss"] = args.iss
    print(jwt.encode(claims, args.secret, algorithm=args.alg))
    return EXIT_OK


# ping, stats


async def _ping(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        for i in range(args.count):
            if i:
                await asyncio.sleep(args.interval)
            rtt = await client.ping()
            print(f"pong from {args.url}: {rtt * 1e3:.2f} ms", flush=True)
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    try:
        base = http_base(args.url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    metrics = fetch_metrics(
        base, timeout=args.timeout, context=_ssl_context(args), token=args.token or None
    )
    sections = summary(metrics)
    if args.json:
        out = {name: {label: value for label, value, _ in rows} for name, rows in sections}
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(render_table(f"broker {base}", sections))
    return EXIT_OK


def _http_base(args: argparse.Namespace) -> str:
    try:
        return http_base(args.url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _fetcher(args: argparse.Namespace, base: str) -> Any:
    context = _ssl_context(args)

    def fetch(path: str) -> Any:
        return fetch_json(base, path, timeout=args.timeout, context=context, token=args.token)

    return fetch


def _listing(args: argparse.Namespace, path: str, sort: str) -> int:
    if not 1 <= args.limit <= 10_000:
        raise UsageError("--limit must be from 1 to 10000")
    base = _http_base(args)
    data = _fetcher(args, base)(f"{path}?sort={sort}&limit={args.limit}")
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        from rich.console import Console

        table = connections_table(data) if path == "/connections" else _topics_table(data)
        console = Console()
        console.print(table, width=max(console.width, WIDE), crop=False)
    return EXIT_OK


def _connections(args: argparse.Namespace) -> int:
    return _listing(args, "/connections", args.sort)


def _topics(args: argparse.Namespace) -> int:
    return _listing(args, "/topics", args.sort)


def _top(args: argparse.Namespace) -> int:
    if args.interval <= 0 or not 1 <= args.limit <= 10_000:
        raise UsageError("--interval must be positive and --limit from 1 to 10000")
    base = _http_base(args)
    view = View(sort=args.sort, topic_sort=args.topic_sort, limit=args.limit)
    run_top(_fetcher(args, base), base, view, interval=args.interval, once=args.once)
    return EXIT_OK


# wiring


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context for wss:// and https://: the system's CAs, or --cafile's."""
    if args.cafile is None:
        return None
    try:
        return ssl.create_default_context(cafile=args.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--cafile {args.cafile}: {exc}") from None


def _client(args: argparse.Namespace, *, report_states: bool = False) -> AsyncClient:
    lost = False

    def on_state(change: StateChange) -> None:
        nonlocal lost
        if change.state is ConnectionState.RECONNECTING:
            lost = True
            _err(f"{change.error}; reconnecting in {change.delay or 0.0:.1f} s")
        elif change.state is ConnectionState.CONNECTED and lost:
            lost = False
            _err(f"reconnected to {args.url}")

    def on_unrecovered(event: Unrecovered) -> None:
        where = f" from {event.previous}" if event.previous is not None else ""
        _err(f"{event.topic}: not recovered{where} ({event.reason}); live messages follow")

    if args.cafile is not None and not args.url.startswith("wss:"):
        raise UsageError("--cafile is for wss:// URLs")
    return AsyncClient(
        args.url,
        encoding="msgpack" if getattr(args, "msgpack", False) else "json",
        request_timeout=args.timeout,
        open_timeout=args.timeout,
        on_state_change=on_state if report_states else None,
        on_error=lambda error: _err(f"broker: {error}"),
        on_unrecovered=on_unrecovered,
        token=args.token or None,
        ssl=_ssl_context(args),
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Command-line client for the broker (wire protocol v1).",
        epilog=(
            "exit codes: 0 ok, 1 the broker answered with an error, 2 bad usage or input, "
            "3 broker unreachable or connection lost, 130 interrupted"
        ),
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("BROKER_URL", DEFAULT_URL),
        help="broker WebSocket URL (default: $BROKER_URL or %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for a connection or an answer (default: %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("BROKER_TOKEN"),
        metavar="JWT",
        help="token sent as Authorization: Bearer (default: $BROKER_TOKEN)",
    )
    parser.add_argument(
        "--cafile",
        metavar="FILE",
        help="PEM CA certificate(s) to verify a wss:// broker with (default: the system's)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log the client's debug output"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pub = commands.add_parser(
        "publish",
        help="publish a message and print how many subscribers it was delivered to",
        description=(
            "Publish DATA (JSON; a string with --raw) to TOPIC and print the delivered count "
            "(the number of connections it was queued to). Without DATA, or with '-', read it "
            "from stdin; with --lines each line of stdin is one message. With several messages "
            "the total delivered count is printed and a summary goes to stderr."
        ),
    )
    pub.add_argument("topic", metavar="TOPIC", help="concrete topic, e.g. sensors.kitchen")
    pub.add_argument("data", metavar="DATA", nargs="?", help="JSON value, or '-' for stdin")
    pub.add_argument("--raw", action="store_true", help="send DATA (or each line) as a string")
    pub.add_argument("--lines", action="store_true", help="stdin: one message per line")
    pub.add_argument("--count", type=int, default=1, metavar="N", help="send each message N times")
    pub.add_argument("--rate", type=float, metavar="R", help="at most R messages per second")
    pub.add_argument("--no-ack", action="store_true", help="do not wait for acknowledgements")
    pub.add_argument("--msgpack", action="store_true", help="use the msgpack encoding")
    pub.add_argument(
        "--window", type=int, default=64, metavar="W", help=argparse.SUPPRESS
    )  # publishes in flight at once
    pub.set_defaults(run=_publish)

    sub = commands.add_parser(
        "subscribe",
        help="print messages as JSON lines",
        description=(
            'Subscribe to each TOPIC (wildcards: "*" one token, a final ">" the rest) and print '
            'one JSON line per message: {"topic", "seq", "data"} (binary data as base64 with '
            '"encoding": "base64"). Runs until Ctrl-C or --count messages; reconnects by itself '
            "and recovers what it missed meanwhile when the broker still has it (stderr says when "
            "it could not)."
        ),
    )
    sub.add_argument("topics", metavar="TOPIC", nargs="+", help="topic or pattern")
    sub.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    sub.add_argument("--msgpack", action="store_true", help="use the msgpack encoding")
    sub.add_argument(
        "--show-seq",
        action="store_true",
        help='add "epoch" to each line and print each topic\'s starting EPOCH:SEQ on stderr',
    )
    sub.add_argument(
        "--since",
        metavar="EPOCH:SEQ",
        help="first replay the retained messages after this position (one concrete TOPIC)",
    )
    sub.set_defaults(run=_subscribe)

    hist = commands.add_parser(
        "history",
        help="print a topic's retained messages as JSON lines",
        description=(
            "Print the retained messages of a concrete TOPIC, oldest first, as the JSON lines of "
            'subscribe (with "epoch"); the topic\'s position and whether the range was complete '
            "go to stderr."
        ),
    )
    hist.add_argument("topic", metavar="TOPIC", help="concrete topic")
    hist.add_argument("--since", metavar="EPOCH:SEQ", help="only the messages after this position")
    hist.add_argument("--limit", type=int, metavar="N", help="at most N messages")
    hist.set_defaults(run=_history)

    tok = commands.add_parser(
        "token",
        help="sign a token for development (PyJWT)",
        description=(
            "Print a JWT signed with SECRET for a broker started with --auth-secret SECRET. For "
            "development and tests: production tokens come from your identity provider."
        ),
    )
    tok.add_argument("--secret", required=True, help="the broker's --auth-secret")
    tok.add_argument("--sub", required=True, metavar="USER", help="the user id (sub claim)")
    tok.add_argument(
        "--publish", action="append", default=[], metavar="P", help="may publish to P (repeat)"
    )
    tok.add_argument(
        "--subscribe", action="append", default=[], metavar="P", help="may subscribe to P (repeat)"
    )
    tok.add_argument("--admin", action="store_true", help="may read /stats")
    tok.add_argument(
        "--ttl",
        type=int,
        default=3600,
        metavar="S",
        help="seconds until exp (default: %(default)s)",
    )
    tok.add_argument(
        "--alg",
        default="HS256",
        choices=["HS256", "HS384", "HS512"],
        help="HMAC algorithm (default: %(default)s)",
    )
    tok.add_argument("--aud", help="audience claim, for a broker with --auth-audience")
    tok.add_argument("--iss", help="issuer claim, for a broker with --auth-issuer")
    tok.set_defaults(run=_token)

    ping = commands.add_parser(
        "ping",
        help="measure a round trip through the broker",
        description="Send protocol pings and print each round-trip time.",
    )
    ping.add_argument("--count", type=int, default=1, metavar="N", help="pings to send")
    ping.add_argument("--interval", type=float, default=1.0, metavar="S", help="between pings")
    ping.set_defaults(run=_ping)

    stats = commands.add_parser(
        "stats",
        help="show the broker's key metrics",
        description=(
            "Read the broker's Prometheus /metrics (its HTTP URL is derived from --url: "
            "ws://HOST:PORT/ws -> http://HOST:PORT/metrics) and print the key figures. --token "
            "goes along as Bearer, for a broker started with --metrics-token."
        ),
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(run=_stats)

    top = commands.add_parser(
        "top",
        help="live view of the connections that lag and the busiest topics",
        description=(
            "A live view, redrawn every --interval, of the connections that lag most and the "
            "busiest topics (GET /connections and /topics; --token must be an admin token when "
            "the broker has auth on). Keys: l lag, a age, d dropped (connections); r rate, "
            "s subscribers (topics); q quit. Not on a terminal, or with --once, it prints one "
            "frame and exits."
        ),
    )
    top.add_argument("--sort", choices=CONNECTION_SORTS, default="lag", help="connections by")
    top.add_argument("--topic-sort", choices=TOPIC_SORTS, default="rate", help="topics by")
    top.add_argument("--limit", type=int, default=15, metavar="N", help="rows of each")
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between redraws"
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(run=_top)

    conns = commands.add_parser(
        "connections",
        help="list the connections that lag most (or are oldest, or dropped most)",
        description=(
            "Print GET /connections as a table, or as the broker's JSON with --json: per "
            "connection, bytes and frames queued, the oldest queued frame's age, messages "
            "dropped, subscriptions, remote address, user, connected since."
        ),
    )
    conns.add_argument("--sort", choices=CONNECTION_SORTS, default="lag", help="(default: lag)")
    conns.add_argument("--limit", type=int, default=20, metavar="N", help="at most N")
    conns.add_argument("--json", action="store_true", help="print JSON instead of a table")
    conns.set_defaults(run=_connections)

    topics = commands.add_parser(
        "topics",
        help="list the busiest topics (or the most subscribed patterns)",
        description=(
            "Print GET /topics as a table, or as the broker's JSON with --json: publishes per "
            "second over the last second and subscribers, by rate, or the patterns most "
            "subscribed with --sort subscribers."
        ),
    )
    topics.add_argument("--sort", choices=TOPIC_SORTS, default="rate", help="(default: rate)")
    topics.add_argument("--limit", type=int, default=20, metavar="N", help="at most N")
    topics.add_argument("--json", action="store_true", help="print JSON instead of a table")
    topics.set_defaults(run=_topics)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the command, and map expected failures to an exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills an optional positional in the first run of positionals, so in
    # `publish TOPIC --raw DATA` the DATA after the option comes back unrecognised: take it here.
    late_data = len(extra) == 1 and (extra[0] == "-" or not extra[0].startswith("-"))
    if late_data and args.command == "publish" and args.data is None:
        args.data, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format=f"{PROG}: %(message)s",
    )
    try:
        if inspect.iscoroutinefunction(args.run):
            return int(asyncio.run(args.run(args)))
        return int(args.run(args))
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"{PROG}: error: {exc}\n")
    except BrokerError as exc:
        _err(f"error: the broker refused: {exc}")
        return EXIT_BROKER_ERROR
    except RequestTimeoutError as exc:
        _err(f"error: {exc}")
        return EXIT_UNREACHABLE
    except BrokerConnectionError as exc:
        _err(f"error: {exc}")
        return EXIT_UNREACHABLE
    except BrokerClientError as exc:
        _err(f"error: {exc}")
        return EXIT_BROKER_ERROR
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "subscribe" else EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def main() -> NoReturn:
    """Console-script entry point (`broker-cli`)."""
    sys.exit(run())
