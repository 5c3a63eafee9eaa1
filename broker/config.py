"""Broker configuration: one frozen dataclass, filled from defaults, `BROKER_*` variables and flags.

Precedence is flag > environment > default. Every limit the broker enforces on network input lives
here, so a reader can see in one place what a hostile client can and cannot make the broker do.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

SlowConsumerPolicy = Literal["disconnect", "drop", "conflate"]
OVERFLOW_POLICIES = ("disconnect", "drop", "conflate")
PollerName = Literal["epoll", "poll", "select"]  # broker/net/pollers.py
LogFormat = Literal["text", "json"]


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True, slots=True)
class Config:
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8765, "TCP port for WebSocket and HTTP")
    backlog: int = _opt(4096, "listen backlog (the kernel caps it at net.core.somaxconn)")
    max_connections: int = _opt(0, "connection limit; 0 = as many as the open-files limit allows")
    max_message_size: int = _opt(1 << 20, "largest client message after reassembly, bytes (1009)")
    max_http_body: int = _opt(1 << 20, "largest HTTP request body, bytes (413)")
    max_subscriptions: int = _opt(1000, "subscriptions one connection may hold")
    outbound_high_water: int = _opt(
        1 << 20, "bytes queued to one connection before it is a slow consumer"
    )
    slow_consumer_policy: SlowConsumerPolicy = _opt(
        "disconnect",
        "what a connection over --outbound-high-water gets for topics no --overflow names",
        choices=OVERFLOW_POLICIES,
    )
    publish_rate: float = _opt(0.0, "publishes per second per connection; 0 = unlimited")
    publish_burst: int = _opt(1000, "burst allowed above --publish-rate")
    handshake_timeout: float = _opt(10.0, "seconds to complete the HTTP request or handshake")
    ping_interval: float = _opt(60.0, "ping a connection silent this many seconds")
    ping_timeout: float = _opt(30.0, "close a pinged connection silent this much longer")
    close_timeout: float = _opt(5.0, "seconds to wait for the peer's close frame or drain")
    shutdown_timeout: float = _opt(10.0, "seconds SIGTERM waits for queues to drain")
    read_size: int = _opt(256 * 1024, "bytes asked of one recv()")
    busy_flush_delay: float = _opt(
        0.25,
        "while clients send faster than the broker routes (a recv fills --read-size), deliveries "
        "wait at most this many seconds to be written together: fewer, larger sends; "
        "0 = write after every loop iteration",
    )
    topic_cache_size: int = _opt(16384, "exact topics whose subscriber lists are cached")
    seq_topics: int = _opt(
        100_000, "topics whose positions (epoch, seq) are kept; the least recently used go"
    )
    # -- tls --
    tls_cert: str = _opt("", "PEM certificate chain; with --tls-key the port speaks TLS only")
    tls_key: str = _opt("", "PEM private key of --tls-cert (SIGHUP reloads both)")
    # -- perimeter (who may open a WebSocket; broker/auth/perimeter.py) --
    allowed_origins: str = _opt(
        "",
        "comma-separated origins allowed to open a WebSocket, exact (https://app.example.com) or "
        "by subdomain (https://*.example.com); others get 403; requests without Origin pass; "
        "empty = any",
    )
    max_connections_per_ip: int = _opt(
        0, "WebSockets one address (IPv6: one /64) may hold; more upgrades get 503; 0 = off"
    )
    handshake_rate: float = _opt(
        0.0, "WebSocket handshakes per second per address (token bucket; then 429); 0 = off"
    )
    handshake_burst: int = _opt(10, "handshakes an address may make at once above --handshake-rate")
    # -- history and recovery (pubsub/history.py) --
    history_size: int = _opt(100, "messages kept per topic for recovery; 0 = no history")
    history_ttl: float = _opt(300.0, "seconds a message is kept for recovery; 0 = no limit")
    history_memory: int = _opt(
        64 << 20, "bytes of history for all topics; least recently published lose it first"
    )
    # -- poller (measurement only: broker-bench pollers, docs/benchmarks.md) --
    poller: PollerName = _opt(
        "epoll",
        "how the loop waits for sockets: epoll is the only production choice; poll and select "
        "exist to measure why (their cost grows with every idle connection; select also cannot "
        "watch fds >= 1024 and closes such connections at accept)",
        choices=("epoll", "poll", "select"),
    )
    # -- workers (broker/supervisor.py, net/hub.py) --
    workers: int = _opt(
        1,
        "worker processes sharing the port (SO_REUSEPORT) under a supervising parent that "
        "routes messages between them; 1 = one process, 0 = one per core",
    )
    worker_timeout: float = _opt(
        30.0,
        "with --workers: a worker whose loop sent no heartbeat (one a second) for this many "
        "seconds is hung: the parent kills it (SIGKILL) and restarts it; 0 = off, else >= 1",
    )
    # -- redis cluster (net/redis.py) --
    redis: str = _opt(
        "",
        "redis://[[user]:password@]host:port/db (or rediss:// for TLS): nodes sharing this Redis "
        "form one cluster (seq, epochs, history and routing in Redis); empty = off",
    )
    redis_prefix: str = _opt("broker", "prefix of every Redis key and channel (several clusters)")
    redis_ca: str = _opt("", "CA file to verify a rediss:// server with; empty = system CAs")
    redis_buffer: int = _opt(
        16 << 20, "bytes queued to Redis before publishes are refused (unavailable)"
    )
    redis_timeout: float = _opt(
        5.0,
        "seconds to look the host up and connect, or to wait for a PING reply, before Redis "
        "counts as down",
    )
    redis_keep: float = _opt(
        7 * 86400.0, "seconds a topic's seq and epoch stay in Redis after its last use"
    )
    # -- logging --
    log_level: str = _opt("info", "debug, info, warning, error")
    log_format: LogFormat = _opt("text", "text or json", choices=("text", "json"))
    # -- auth (docs/security.md) --
    auth_secret: str = _opt("", "HMAC secret (HS256/384/512, >= 32 bytes); turns auth on")
    auth_public_key: str = _opt(
        "", "PEM public key or certificate file (RS*/PS*, ES*, EdDSA); turns auth on"
    )
    auth_jwks: str = _opt("", "JWKS file, key chosen by the token's kid; turns auth on")
    auth_issuer: str = _opt("", "required iss claim (checked when set)")
    auth_audience: str = _opt("", "required aud claim (checked when set)")
    auth_leeway: float = _opt(5.0, "seconds of clock skew allowed on exp and nbf")
    metrics_token: str = _opt("", "bearer token GET /metrics requires; empty = /metrics open")
    metrics_token_file: str = _opt("", "file holding the --metrics-token (read at start)")
    # -- overflow (per topic pattern; docs/design.md "Overflow policies") --
    overflow: tuple[str, ...] = _opt(
        (),
        "PATTERN=POLICY (disconnect, drop, conflate): what a connection over the high-water mark "
        "gets for topics PATTERN matches; repeatable; the most specific pattern wins (fewer "
        "wildcards, then more tokens, then * before >, then the first given); env: a comma- or "
        "space-separated list",
        metavar="PATTERN=POLICY",
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    if isinstance(f.default, tuple):  # a list-valued flag: its variable is a list too
        return tuple(item for item in raw.replace(",", " ").split() if item)
    kind: Any = type(f.default)
    value = kind(raw)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{f.name} must be one of {', '.join(choices)}, not {raw!r}")
    return value


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config from flags and `BROKER_<NAME>` variables; invalid values exit with usage."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="broker",
        description="WebSocket pub/sub broker. Every flag can also be set as BROKER_<FLAG>.",
    )
    values: dict[str, Any] = {}
    lists: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(Config):
        env_name = "BROKER_" + f.name.upper()
        default: Any = f.default
        if env_name in environ:
            try:
                default = _convert(f, environ[env_name])
            except ValueError as exc:
                parser.error(f"{env_name}: {exc}")
        help_text = f"{f.metadata['help']} (default {f.default}; env {env_name})"
        if isinstance(f.default, tuple):
            # Repeatable; given on the command line, the flags replace the variable's list.
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                action="append",
                default=None,
                metavar=f.metadata.get("metavar"),
                help=help_text,
            )
            lists[f.name] = tuple(default)
            continue
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=type(f.default),
            default=default,
            choices=f.metadata.get("choices"),
            help=help_text,
        )
    ns = parser.parse_args(argv)
    values = vars(ns)
    for name, from_env in lists.items():
        given = values[name]
        values[name] = tuple(given) if given is not None else from_env
    config = Config(**values)
    problems = validate(config)
    if problems:
        parser.error("; ".join(problems))
    return config


def _redis_url_problem(url: str) -> str | None:
    """What is wrong with a --redis URL (net/redis.parse_url reads it), or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return "must be a redis:// or rediss:// URL"
    if not parts.hostname:
        return "the URL names no host"
    try:
        parts.port  # noqa: B018 (it raises ValueError when out of range)
    except ValueError:
        return "the URL's port is not 0-65535"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return "the URL's path must be a database number"
    return None


def validate(config: Config) -> list[str]:
    problems = []
    for name in ("max_message_size", "max_http_body", "outbound_high_water", "read_size"):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be positive")
    for name in ("handshake_timeout", "ping_interval", "ping_timeout", "close_timeout"):
        if getattr(config, name) <= 0:
            problems.append(f"{name} must be positive")
    if not 0 <= config.port <= 65535:
        problems.append("port must be 0..65535")
    if not 0 <= config.busy_flush_delay <= 10:
        problems.append("busy_flush_delay must be 0..10 seconds")
    if config.max_subscriptions < 0 or config.max_connections < 0:
        problems.append("limits cannot be negative")
    if bool(config.tls_cert) != bool(config.tls_key):
        problems.append("--tls-cert and --tls-key go together: give both or neither")
    # -- auth --
    sources = [n for n in ("auth_secret", "auth_public_key", "auth_jwks") if getattr(config, n)]
    if len(sources) > 1:
        problems.append("give only one of " + ", ".join(_flag(n) for n in sources))
    if not config.auth_leeway >= 0:
        problems.append("auth_leeway must be 0 or more")
    if config.metrics_token and config.metrics_token_file:
        problems.append("give --metrics-token or --metrics-token-file, not both")
    if config.max_connections_per_ip < 0 or config.handshake_rate < 0:
        problems.append("perimeter limits cannot be negative")
    if config.handshake_rate > 0 and config.handshake_burst < 1:
        problems.append("handshake_burst must be at least 1 when handshake_rate is set")
    if config.history_size < 0 or config.history_ttl < 0:
        problems.append("history_size and history_ttl cannot be negative")
    if config.redis:
        problem = _redis_url_problem(config.redis)
        if problem:
            problems.append(f"redis: {problem}")
    if config.redis_buffer < 1 or config.redis_timeout <= 0 or config.redis_keep <= 0:
        problems.append("redis_buffer, redis_timeout and redis_keep must be positive")
    if config.workers < 0:
        problems.append("workers cannot be negative")
    # Below 1 s a long loop iteration (a large fan-out, a GC pause) would kill healthy workers;
    # `not >=` also refuses NaN.
    if config.worker_timeout != 0 and not config.worker_timeout >= 1:
        problems.append("worker_timeout must be 0 (off) or at least 1 second")
    if config.history_memory < 1 or config.seq_topics < 1:
        problems.append("history_memory and seq_topics must be positive")
    # -- overflow --
    for rule in config.overflow:
        try:
            parse_overflow(rule)
        except ValueError as exc:
            problems.append(f"--overflow {rule!r}: {exc}")
    return problems


def parse_overflow(rule: str) -> tuple[str, str]:
    """`PATTERN=POLICY` -> (pattern, policy); ValueError says what is wrong. The pattern follows
    the subscribe rules (dot-separated non-empty tokens; `*` a whole token; `>` the last one)."""
    pattern, sep, policy = rule.rpartition("=")
    if not sep or not pattern:
        raise ValueError("expected PATTERN=POLICY")
    if policy not in OVERFLOW_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(OVERFLOW_POLICIES)}, not {policy!r}")
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if not token or token.strip() != token:
            raise ValueError("empty token or spaces in the pattern")
        if ("*" in token or ">" in token) and token not in ("*", ">"):
            raise ValueError("a wildcard is a whole token")
        if token == ">" and i != len(tokens) - 1:
            raise ValueError("> must be the last token")
    return pattern, policy
