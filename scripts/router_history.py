"""What history costs the publish path, without sockets: Router.handle on JSON publish requests.

    .venv/bin/python scripts/router_history.py [--warm N] [broker flags ...]

    W2: 1,000 JSON subscribers on one topic, 64-byte payload: ns of CPU per delivery.
    W4: 10,000 topics with one subscriber each, published round-robin: µs of CPU per publish,
        after N rounds over the topics (default 10: 100,000 messages; 40 fills --history-memory).

Run it with `--history-size 0` and without to compare (docs/benchmarks.md). Counts process CPU
time (not wall time) and keeps the best of 7 passes, so a loaded machine disturbs it less than
the socket benchmarks; pin it (`taskset -c 1`). A measurement, not a test.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.config import parse
from broker.metrics import Stats
from broker.pubsub.router import Router
from broker.pubsub.session import Session

DATA = "#" + "0" * 63
PASSES = 7


def drain(sessions: list[Session], router: Router) -> None:
    for s in sessions:
        s.out.clear()
        s.queued = 0
    router.dirty.clear()


def w2(router: Router) -> float:
    subs = [Session() for _ in range(1000)]
    pub = Session()
    for s in subs:
        router.subscribe(s, "bench")
    payload = json.dumps({"op": "publish", "topic": "bench", "data": DATA})
    best = float("inf")
    for _ in range(PASSES):
        start = time.process_time_ns()
        for i in range(100):
            router.handle(pub, payload, False)
            if i % 10 == 9:
                drain(subs, router)
        best = min(best, (time.process_time_ns() - start) / (100 * len(subs)))
    return best


def w4(router: Router, warm: int) -> float:
    topics = [f"t{i}" for i in range(10_000)]
    subs = [Session() for _ in topics]
    pub = Session()
    for s, t in zip(subs, topics, strict=True):
        router.subscribe(s, t)
    payloads = [json.dumps({"op": "publish", "topic": t, "data": DATA}) for t in topics]
    for _ in range(warm):
        for p in payloads:
            router.handle(pub, p, False)
        drain(subs, router)
    best = float("inf")
    for _ in range(PASSES):
        start = time.process_time_ns()
        for p in payloads:
            router.handle(pub, p, False)
        best = min(best, (time.process_time_ns() - start) / len(payloads))
        drain(subs, router)
    return best / 1000


def main(argv: list[str]) -> None:
    warm = 10
    if argv[:1] == ["--warm"]:
        warm, argv = int(argv[1]), argv[2:]
    cfg = parse(argv, environ={})
    print(
        f"flags {' '.join(argv) or '(defaults)'}: W2 {w2(Router(cfg, Stats())):.1f} ns/delivery, "
        f"W4 {w4(Router(cfg, Stats()), warm):.2f} us/publish"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
