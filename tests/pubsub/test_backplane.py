"""The backplane seam without sockets: interest refcounts, refusals, and exactly-once recovery.

`Recorder` is a transport that records what the router asks of the hub; the tests answer as a
hub would, in the orders a real transport can produce (over Redis, live messages newer than the
answer may arrive before it).
"""

from __future__ import annotations

from typing import Any

from broker.pubsub.backplane import Backplane
from broker.pubsub.router import Router
from broker.pubsub.session import Session
from broker.wire import messages
from broker.wire.codec import Encoding
from broker.wire.messages import Since
from tests.pubsub.test_router import frames, make


class Recorder(Backplane):
    def __init__(self) -> None:
        super().__init__(max_pending=4)
        self.sent: list[tuple[Any, ...]] = []

    def send_interest(self, pattern: str, encoding: int, add: bool) -> None:
        self.sent.append(("interest", pattern, encoding, add))

    def send_publish(self, n: int, topic: str, data: Any, size: int) -> None:
        self.sent.append(("publish", n, topic, data))

    def send_window(self, n: int, topic: str, encoding: int, since: Since | None) -> None:
        self.sent.append(("window", n, topic, encoding, since))

    def send_history(
        self, n: int, topic: str, since: Since | None, limit: int, budget: int
    ) -> None:
        self.sent.append(("history", n, topic, since, limit))


def setup() -> tuple[Router, Recorder]:
    router = make()
    hub = Recorder()
    router.backplane = hub
    hub.came_up()
    return router, hub


def request(router: Router, session: Session, text: str) -> None:
    router.handle(session, text, False)


def live(topic: str, seq: int, data: Any) -> list[bytes | None]:
    return [messages.message(topic, data, seq, Encoding.JSON), None]


def test_interest_is_sent_on_the_first_subscriber_and_the_last_unsubscribe() -> None:
    router, hub = setup()
    a, b = Session(), Session()
    request(router, a, '{"op":"subscribe","topic":"x.*","id":1}')
    request(router, b, '{"op":"subscribe","topic":"x.*","id":1}')
    assert hub.sent == [("interest", "x.*", 0, True)]
    request(router, a, '{"op":"unsubscribe","topic":"x.*","id":2}')
    router.drop(b)
    assert hub.sent == [("interest", "x.*", 0, True), ("interest", "x.*", 0, False)]


def test_publish_is_acked_when_the_hub_confirms_with_the_total() -> None:
    router, hub = setup()
    s = Session()
    request(router, s, '{"op":"publish","topic":"t","data":1,"id":7}')
    assert frames(s) == []
    ((kind, n, topic, data),) = hub.sent
    assert (kind, topic, data) == ("publish", "t", 1)
    hub.resolve(n, ["E", 1, 12])
    assert frames(s) == [{"op": "ack", "id": 7, "delivered": 12}]


def test_publish_is_refused_at_once_when_the_hub_is_down_or_too_many_wait() -> None:
    router, hub = setup()
    s = Session()
    for i in range(4):
        request(router, s, f'{{"op":"publish","topic":"t","data":{i},"id":{i}}}')
    request(router, s, '{"op":"publish","topic":"t","data":4,"id":4}')
    (refused,) = frames(s)
    assert refused["code"] == "unavailable" and refused["id"] == 4
    hub.went_down()  # the four in flight fail too: nothing is left waiting silently
    failed = frames(s)
    assert [(f["id"], f["code"]) for f in failed] == [(i, "unavailable") for i in range(4)]
    request(router, s, '{"op":"publish","topic":"t","data":5,"id":5}')
    assert frames(s)[0]["code"] == "unavailable"
    assert hub.refused == 2 and hub.failed == 4


def test_recovery_delivers_the_replay_then_only_newer_live_messages_in_order() -> None:
    router, hub = setup()
    s = Session()
    request(router, s, '{"op":"subscribe","topic":"r","id":1,"since":{"epoch":"E","seq":3}}')
    assert hub.sent[0] == ("interest", "r", 0, True)
    n = hub.sent[1][1]
    # Live messages 5 and 6 arrive before the answer (another connection carries them).
    router.deliver("r", 5, live("r", 5, "e"))
    router.deliver("r", 6, live("r", 6, "f"))
    assert frames(s) == []
    replay = [messages.message("r", d, q, Encoding.JSON) for q, d in ((4, "d"), (5, "e"))]
    hub.resolve(n, ["E", 5, True, replay])
    router.deliver("r", 7, live("r", 7, "g"))
    got = frames(s)
    assert got[0] == {"op": "ack", "id": 1, "epoch": "E", "seq": 5, "recovered": True}
    assert [(m["seq"], m["data"]) for m in got[1:]] == [(4, "d"), (5, "e"), (6, "f"), (7, "g")]
    assert not hub.recovering


def test_a_subscriber_that_leaves_before_the_answer_gets_nothing() -> None:
    router, hub = setup()
    s = Session()
    request(router, s, '{"op":"subscribe","topic":"r","id":1}')
    n = hub.sent[1][1]
    router.drop(s)
    hub.resolve(n, ["E", 0, False, []])
    router.deliver("r", 1, live("r", 1, "x"))
    assert frames(s) == [] and not hub.recovering
    assert hub.sent[-1] == ("interest", "r", 0, False)


def test_a_refused_subscribe_leaves_nothing_behind() -> None:
    router, hub = setup()
    hub.up = False
    s = Session()
    request(router, s, '{"op":"subscribe","topic":"r","id":1}')
    assert frames(s)[0]["code"] == "unavailable"
    assert not hub.recovering and not hub.interest and not s.patterns
