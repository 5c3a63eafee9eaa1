"""Node interop: tests/js/pubsub.mjs talks to a real broker with the `ws` package, both by hand
(protocol v1 frames) and through the clients/js module, and receives what Python publishes."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from broker_client import Client

from tests.conftest import REPO, BrokerProcess

JS = REPO / "tests" / "js"
NODE = shutil.which("node")


def _module(tmp_path: Path) -> Path:
    """The module under test, as an .mjs so Node loads it as ES module whatever its version."""
    assert NODE is not None, "node is missing"
    assert (JS / "node_modules" / "ws").is_dir(), "run `npm install` in tests/js (make test does)"
    module = tmp_path / "broker-client.mjs"
    shutil.copyfile(REPO / "clients" / "js" / "broker-client.js", module)
    return module


def test_node_ws_client_and_js_module_through_the_broker(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    module = _module(tmp_path)
    assert NODE is not None
    proc = subprocess.Popen(
        [NODE, str(JS / "pubsub.mjs"), broker.url, str(module)],
        cwd=JS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A thread reads stdout line by line: select() on a buffered pipe would miss lines that
    # already sit in the file object's buffer.
    assert proc.stdout is not None and proc.stderr is not None
    queue: Queue[str] = Queue()
    stdout = proc.stdout

    def pump() -> None:
        for text in stdout:
            queue.put(text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    lines: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 15
        while not lines or lines[-1].get("step") != "ready":
            try:
                line = queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                raise AssertionError(f"node never got ready: {lines}") from None
            lines.append(json.loads(line))
            assert "step" in lines[-1], lines[-1]
        with Client(broker.url) as client:
            assert client.publish("node.raw.py", {"from": "python"}) == 2  # raw ws + the module
        proc.wait(15)
        reader.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, err
    while not queue.empty():
        lines.append(json.loads(queue.get()))
    steps = {line["step"]: line for line in lines}

    raw_publish = steps["raw publish"]
    assert raw_publish["ack"] == {"op": "ack", "id": raw_publish["ack"]["id"], "delivered": 2}
    assert raw_publish["message"] == {
        "op": "message",
        "topic": "node.raw.x",
        "data": {"n": 1},
        "seq": 1,
    }
    assert steps["client publish"]["delivered"] == 2
    assert steps["client publish"]["message"]["data"] == "hi"
    assert steps["client error"]["error"] == {"name": "BrokerError", "code": "bad_request"}
    received = steps["received"]
    assert received["raw"]["data"] == {"from": "python"}
    assert [m["topic"] for m in received["client"]] == ["node.raw.x", "node.raw.y", "node.raw.py"]
    assert received["client"][2] == {"topic": "node.raw.py", "data": {"from": "python"}, "seq": 1}
    assert received["rtt"] is True


SECRET = "node-test-secret-of-32-bytes-or-more"  # PyJWT warns below 32


def _auth_recovery(broker: BrokerProcess, module: Path, part: str) -> dict[str, Any]:
    """Run one part of tests/js/auth_recovery.mjs; its output lines by step."""
    assert NODE is not None
    proc = subprocess.run(
        [NODE, str(JS / "auth_recovery.mjs"), broker.url, str(module), SECRET, part],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (lines, proc.stderr)
    steps = {line["step"]: line for line in lines}
    assert "done" in steps, lines
    return steps


def test_js_module_with_auth_in_node(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """Tokens minted in Node: refusal (with its status), forbidden, a narrower token's revoked
    subscription, refresh through a function past the first exp, 4001 with a fixed token."""
    broker = broker_factory("--auth-secret", SECRET, "--auth-leeway", "0")
    steps = _auth_recovery(broker, _module(tmp_path), "auth")

    refused = steps["refused"]  # Node's ws shows the status a browser hides
    assert refused["error"] == {"name": "ConnectionRefusedError", "code": None, "status": 401}
    assert refused["events"] == [refused["error"]]
    assert refused["state"] == "closed"
    assert refused["refused"] is True

    token = steps["token"]
    assert token["delivered"] == 1
    assert token["message"] == {"topic": "node.a", "data": 1, "seq": 1}
    assert token["publish"] == {
        "name": "ForbiddenError",
        "code": "forbidden",
        "status": None,
        "forbidden": True,
    }
    assert token["subscribe"] == {"name": "ForbiddenError", "code": "forbidden", "status": None}
    assert token["revoked"] == ["node.b"]  # the narrower token sent with the auth op
    assert token["ended"] == {"name": "ForbiddenError", "code": "forbidden", "status": None}
    assert token["errors"] == [token["ended"]]
    assert token["subscriptions"] == ["node.a"]

    refresh = steps["refresh"]  # past the first token's exp on the same socket
    assert refresh["tokens"] >= 2
    assert refresh["sameSocket"] is True
    assert refresh["states"] == ["connecting", "connected"]
    assert refresh["expired"] == 0

    again = steps["reconnect token"]  # each attempt asked the function for a token
    assert again == {"step": "reconnect token", "calls": 2, "distinct": 2, "delivered": 0}

    expired = steps["expired"]
    assert expired["state"] == "closed"
    assert expired["events"] == [
        {"name": "TokenExpiredError", "code": 4001, "status": None, "reconnect": False}
    ]
    assert expired["error"] == {"name": "TokenExpiredError", "code": 4001, "status": None}


def test_js_module_history_and_recovery_in_node(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """history() from the start, after a position and on a stale epoch; recovery across three
    dropped sockets (abrupt and clean) with a publisher running, and across a 4001 answered with
    a fresh token from the function: every seq once, in order."""
    broker = broker_factory("--auth-secret", SECRET, "--auth-leeway", "0")
    steps = _auth_recovery(broker, _module(tmp_path), "recovery")

    history = steps["history"]
    assert [m["seq"] for m in history["all"]["messages"]] == [1, 2, 3, 4, 5]
    assert history["all"]["messages"][0] == {"topic": "node.h", "seq": 1, "data": {"i": 1}}
    assert history["all"]["seq"] == 5
    assert history["after"]["recovered"] is True
    assert [m["data"] for m in history["after"]["messages"]] == [{"i": 3}, {"i": 4}]
    assert history["stale"] == {"recovered": False, "count": 5}  # then the oldest retained
    assert history["denied"] == {"name": "ForbiddenError", "code": "forbidden", "status": None}

    recovery = steps["recovery"]  # 300 messages, three dropped sockets
    assert recovery["count"] == 300
    assert recovery["inOrder"] is True  # every seq once, in order: no loss, no duplicate
    assert recovery["recovered"] == 3
    assert recovery["position"]["seq"] == 300
    assert recovery["position"]["epoch"] == recovery["epoch"]
    assert recovery["unrecovered"] == [["node.*", "wildcard"]] * 3

    across = steps["expired and recovered"]  # 4001, a fresh token, and nothing missed
    assert across["expired"] == [
        {"name": "TokenExpiredError", "code": 4001, "status": None, "reconnect": True}
    ]
    assert across["recovered"] == 1
    assert across["seqs"] == list(range(1, across["published"] + 1))
