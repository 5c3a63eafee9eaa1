"""broker-cli as a subprocess against a real broker: publish, subscribe, stats, ping, and the exit
codes and messages of expected failures (never a traceback)."""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from broker_client import Client

from tests.conftest import BrokerProcess, free_port

_SCRIPT = Path(sys.executable).with_name("broker-cli")
# The installed console script when there is one (what users run), else the same main() by module.
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "broker_client"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ENV.pop("BROKER_URL", None)


def cli(*args: str, stdin: str = "", timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
    )


@contextmanager
def subscriber(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`broker-cli ... subscribe ...` running until it says it is subscribed."""
    proc = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 15
        line = ""
        while "subscribed to" not in line:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stderr], [], [], max(0.0, remaining))
            assert ready, "broker-cli subscribe never said it was subscribed"
            line = proc.stderr.readline()
            assert line, f"broker-cli subscribe exited: {proc.wait(5)}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)  # reaps it and closes the pipes


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("broker-cli:"), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_publish_reaches_a_subscriber_and_prints_the_delivered_count(broker: BrokerProcess) -> None:
    with Client(broker.url) as client:
        sub = client.subscribe("cli.pub")
        result = cli("--url", broker.url, "publish", "cli.pub", '{"n": 1, "s": "é"}')
        assert result.returncode == 0, result.stderr
        assert result.stdout == "1\n"
        assert sub.get(5).data == {"n": 1, "s": "é"}

        # --raw text, stdin with '-', and the BROKER_URL environment variable.
        env_run = subprocess.run(
            [*CLI, "publish", "cli.pub", "--raw", "-"],
            input="plain text\n",
            capture_output=True,
            text=True,
            timeout=20,
            env={**ENV, "BROKER_URL": broker.url},
            check=False,
        )
        assert env_run.returncode == 0, env_run.stderr
        assert env_run.stdout == "1\n"
        assert sub.get(5).data == "plain text"


def test_publish_lines_count_and_rate(broker: BrokerProcess) -> None:
    with Client(broker.url, encoding="msgpack") as client:
        sub = client.subscribe("cli.load")
        result = cli(
            "--url",
            broker.url,
            "publish",
            "cli.load",
            "--lines",
            "--msgpack",
            stdin='1\n"two"\n\n[3]\n',
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "3\n"  # total delivered over three messages
        assert "published 3 messages" in result.stderr
        assert [sub.get(5).data for _ in range(3)] == [1, "two", [3]]

        start = time.monotonic()
        result = cli(
            "--url", broker.url, "publish", "cli.load", "7", "--count", "10", "--rate", "50"
        )
        elapsed = time.monotonic() - start
        assert result.returncode == 0, result.stderr
        assert result.stdout == "10\n"
        assert elapsed >= 9 / 50  # paced: the 10th message leaves 9/50 s after the first
        assert [sub.get(5).seq for _ in range(10)] == list(range(4, 14))


def test_subscribe_prints_json_lines_of_what_is_published(broker: BrokerProcess) -> None:
    with subscriber(
        "--url", broker.url, "subscribe", "cli.sub.>", "cli.other", "--count", "3"
    ) as proc:
        with Client(broker.url) as client:
            client.publish("cli.sub.a", {"x": 1})
            client.publish("cli.other", "two")
            client.publish("cli.sub.b.c", [3])
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [
        {"topic": "cli.sub.a", "seq": 1, "data": {"x": 1}},
        {"topic": "cli.other", "seq": 1, "data": "two"},
        {"topic": "cli.sub.b.c", "seq": 1, "data": [3]},
    ]


def test_subscribe_msgpack_prints_binary_as_base64(broker: BrokerProcess) -> None:
    with subscriber(
        "--url", broker.url, "subscribe", "--msgpack", "cli.bin", "--count", "1"
    ) as proc:
        request = urllib.request.Request(
            broker.http + "/publish/cli.bin",
            data=b"\x00\x01binary",
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(request, timeout=5).close()
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert json.loads(out) == {
        "topic": "cli.bin",
        "seq": 1,
        "data": "AAFiaW5hcnk=",
        "encoding": "base64",
    }


def test_subscribe_stops_cleanly_on_ctrl_c(broker: BrokerProcess) -> None:
    with subscriber("--url", broker.url, "subscribe", "cli.int") as proc:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "Traceback" not in err


def test_stats_shows_key_metrics(broker: BrokerProcess) -> None:
    with Client(broker.url) as client:
        client.subscribe("cli.stats")
        for i in range(5):
            client.publish("cli.stats", i)
        result = cli("--url", broker.url, "stats")
        assert result.returncode == 0, result.stderr
        table = result.stdout
        assert table.startswith(f"broker {broker.http}")
        for label in ("connections", "subscriptions", "messages published", "resident memory"):
            assert label in table
        published = next(line for line in table.splitlines() if "messages published" in line)
        assert published.split()[-1] == "5"

        as_json = json.loads(cli("--url", broker.url, "stats", "--json").stdout)
        assert as_json["pub/sub"]["messages delivered"] == "5"
        assert as_json["pub/sub"]["subscriptions"] == "1"


def test_ping(broker: BrokerProcess) -> None:
    result = cli("--url", broker.url, "ping", "--count", "2", "--interval", "0.05")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pong from") == 2


@pytest.mark.parametrize(
    "command",
    [["publish", "t", "1"], ["subscribe", "t"], ["stats"], ["ping"]],
    ids=lambda c: c[0],
)
def test_unreachable_broker_is_a_clear_error(command: list[str]) -> None:
    port = free_port()
    result = cli("--url", f"ws://127.0.0.1:{port}/ws", *command)
    assert_clean_failure(result, 3, "error:", "refused", f"127.0.0.1:{port}")


def test_broker_error_reply_exits_1(broker: BrokerProcess) -> None:
    result = cli("--url", broker.url, "publish", "not.*.allowed", "1")
    assert_clean_failure(result, 1, "bad_request", "wildcard")


def test_bad_input_exits_2(broker: BrokerProcess) -> None:
    assert_clean_failure(cli("--url", broker.url, "publish", "t", "{not json"), 2, "--raw")
    assert_clean_failure(cli("--url", broker.url, "publish", "t", stdin=""), 2, "nothing")
    usage = cli("publish")
    assert usage.returncode == 2 and "TOPIC" in usage.stderr


def test_help_explains_each_command() -> None:
    top = cli("--help")
    assert top.returncode == 0
    for command in ("publish", "subscribe", "stats", "--url", "BROKER_URL"):
        assert command in top.stdout
    for command, words in {
        "publish": ("--raw", "--lines", "--count", "--rate", "stdin"),
        "subscribe": ("--count", "--msgpack", "JSON line"),
        "stats": ("/metrics",),
    }.items():
        text = cli(command, "--help").stdout
        for word in words:
            assert word in text, (command, word)


def test_subscribe_into_a_closed_pipe_exits_quietly(broker: BrokerProcess) -> None:
    # `broker-cli subscribe t | head -1`: the reader goes away after one line.
    cmd = shlex.join([*CLI, "--url", broker.url, "subscribe", "cli.pipe"]) + " | head -n 1"
    proc = subprocess.Popen(
        ["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        with Client(broker.url) as client:
            deadline = time.monotonic() + 10
            while client.publish("cli.pipe", "x") == 0:  # until the CLI has subscribed
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for _ in range(20):  # the next write after head exits hits the closed pipe
                if proc.poll() is not None:
                    break
                client.publish("cli.pipe", "y")
                time.sleep(0.05)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert json.loads(out)["data"] == "x"
    assert "Traceback" not in err and "BrokenPipe" not in err, err


SECRET = "a-development-secret-long-enough-for-hs384-and-hs512-keys-0123456789"


def test_token_signs_the_claims_asked_for() -> None:
    import jwt

    done = cli(
        "token", "--secret", SECRET, "--sub", "alice", "--publish", "a.>", "--publish", "b",
        "--subscribe", ">", "--admin", "--ttl", "90", "--alg", "HS384",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS384"])
    assert claims["sub"] == "alice" and claims["admin"] is True
    assert (claims["publish"], claims["subscribe"]) == (["a.>", "b"], [">"])
    assert claims["exp"] - claims["iat"] == 90
    bare = jwt.decode(cli("token", "--secret", SECRET, "--sub", "u").stdout.strip(), SECRET,
                      algorithms=["HS256"])  # fmt: skip
    assert (bare["publish"], bare["subscribe"], "admin" in bare) == ([], [], False)
    assert_clean_failure(cli("token", "--secret", SECRET, "--sub", "u", "--ttl", "0"), 2, "--ttl")
    assert cli("token", "--sub", "u").returncode == 2  # --secret is required


def test_since_must_be_a_position_on_one_concrete_topic(broker: BrokerProcess) -> None:
    url = ["--url", broker.url]
    assert_clean_failure(cli(*url, "subscribe", "t", "--since", "nope"), 2, "EPOCH:SEQ")
    assert_clean_failure(cli(*url, "subscribe", "t.*", "--since", "E:1"), 2, "concrete")
    assert_clean_failure(cli(*url, "subscribe", "a", "b", "--since", "E:1"), 2, "concrete")
    assert_clean_failure(cli(*url, "history", "t", "--limit", "0"), 2, "--limit")
