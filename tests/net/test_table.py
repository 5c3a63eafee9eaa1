"""The fd-indexed table: a token outlives nothing (epoll's data.ptr, with a generation)."""

from __future__ import annotations

from broker.net.loop import Table


def test_a_reused_fd_does_not_answer_an_old_token() -> None:
    table = Table(16)
    old_conn, new_conn = object(), object()
    old = table.add(7, old_conn)
    assert table.get(old) is old_conn
    table.remove(7)
    assert table.get(old) is None
    new = table.add(7, new_conn)  # the kernel reused fd 7
    assert new != old
    assert table.get(new) is new_conn
    assert table.get(old) is None, "the old token must not reach the new connection"


def test_the_table_grows_past_its_initial_size() -> None:
    table = Table(4)
    conn = object()
    token = table.add(10, conn)
    assert table.get(token) is conn
    assert table.get(token + 1) is None  # fd 11: never issued
