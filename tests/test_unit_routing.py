"""Unit tests of the in-process route table (ipcbus.core.routing)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from ipcbus.core.contract import Subscription
from ipcbus.core.routing import RouteTable
from ipcbus.message import get_unique_name_for_message

from .messages import OrderPlaced, OrderShipped

ORDERS = get_unique_name_for_message(OrderPlaced)
SHIPMENTS = get_unique_name_for_message(OrderShipped)


class StubBroker:
    """What a Subscription needs of its broker: ``_cancel``."""

    def __init__(self) -> None:
        self.cancelled: list[Subscription] = []

    def _cancel(self, subscription: Subscription) -> None:
        self.cancelled.append(subscription)


def make(
    queue_name: str | None = None,
    predicate: Callable[[Any], bool] | None = None,
    message_type: type[Any] = OrderPlaced,
    handler: Callable[[Any], Any] = print,
) -> Subscription:
    return Subscription(StubBroker(), message_type, handler, predicate, queue_name)  # type: ignore[arg-type]


def test_broadcast_keeps_subscription_order_per_topic() -> None:
    table = RouteTable()
    first, second, third = make(), make(), make()
    shipped = make(message_type=OrderShipped)
    for subscription in (first, second, shipped, third):
        table.add(subscription)
    assert table.broadcast(ORDERS) == (first, second, third)
    assert table.broadcast(SHIPMENTS) == (shipped,)
    assert table.broadcast("no.Such") == ()


def test_remove_broadcast_keeps_the_others_in_order() -> None:
    table = RouteTable()
    first, second, third = make(), make(), make()
    for subscription in (first, second, third):
        table.add(subscription)
    table.remove(second)
    assert table.broadcast(ORDERS) == (first, third)
    table.remove(second)  # twice: nothing changes
    assert table.broadcast(ORDERS) == (first, third)


def test_queue_subscriptions_are_not_broadcast() -> None:
    table = RouteTable()
    member = make("workers")
    table.add(member)
    assert table.broadcast(ORDERS) == ()
    assert table.queue_names(ORDERS) == ("workers",)
    assert table.queue_names(SHIPMENTS) == ()


def test_a_handler_may_subscribe_while_the_snapshot_is_iterated() -> None:
    table = RouteTable()
    first, second = make(), make()
    table.add(first)
    table.add(second)
    added: list[Subscription] = []
    seen = []
    for subscription in table.broadcast(ORDERS):
        seen.append(subscription)
        late = make()
        added.append(late)
        table.add(late)  # would break iteration over a live list
        table.remove(second)
    assert seen == [first, second]  # the snapshot, unchanged
    assert table.broadcast(ORDERS) == (first, *added)


def test_pick_is_round_robin() -> None:
    table = RouteTable()
    members = [make("workers") for _ in range(3)]
    for member in members:
        table.add(member)
    message = OrderPlaced(1)
    picked = [table.pick(ORDERS, "workers", message) for _ in range(7)]
    assert picked == [*members, *members, members[0]]


def test_pick_skips_members_whose_predicate_rejects() -> None:
    table = RouteTable()
    small = make("workers", predicate=lambda m: m.amount < 100)
    any_ = make("workers")
    big = make("workers", predicate=lambda m: m.amount >= 100)
    for member in (small, any_, big):
        table.add(member)
    assert table.pick(ORDERS, "workers", OrderPlaced(1, 500.0)) is any_
    assert table.pick(ORDERS, "workers", OrderPlaced(2, 500.0)) is big
    assert table.pick(ORDERS, "workers", OrderPlaced(3, 500.0)) is any_  # small never
    assert table.pick(ORDERS, "workers", OrderPlaced(4, 5.0)) is small


def test_pick_returns_none_when_no_member_accepts() -> None:
    table = RouteTable()
    table.add(make("workers", predicate=lambda m: False))
    table.add(make("workers", predicate=lambda m: m.order_id < 0))
    assert table.pick(ORDERS, "workers", OrderPlaced(1)) is None
    assert table.pick(ORDERS, "others", OrderPlaced(1)) is None
    assert table.pick("no.Such", "workers", OrderPlaced(1)) is None


def test_a_raising_predicate_rejects_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def broken(message: Any) -> bool:
        raise RuntimeError("predicate bug")

    table = RouteTable()
    failing = make("workers", predicate=broken)
    fine = make("workers")
    table.add(failing)
    table.add(fine)
    with caplog.at_level(logging.ERROR, logger="ipcbus.core.contract"):
        assert table.pick(ORDERS, "workers", OrderPlaced(1)) is fine
    assert "predicate bug" in caplog.text


def test_pick_skips_cancelled_members() -> None:
    table = RouteTable()
    first, second = make("workers"), make("workers")
    table.add(first)
    table.add(second)
    first.cancel()
    assert [table.pick(ORDERS, "workers", OrderPlaced(n)) for n in range(3)] == [second] * 3


def test_groups_are_separate() -> None:
    table = RouteTable()
    one, two = make("one"), make("two")
    table.add(one)
    table.add(two)
    assert table.queue_names(ORDERS) == ("one", "two")
    assert table.pick(ORDERS, "one", OrderPlaced(1)) is one
    assert table.pick(ORDERS, "two", OrderPlaced(1)) is two


def test_removal_keeps_the_group() -> None:
    table = RouteTable()
    first, second = make("workers"), make("workers")
    table.add(first)
    table.add(second)
    table.remove(first)
    assert table.pick(ORDERS, "workers", OrderPlaced(1)) is second
    table.remove(second)
    assert table.queue_names(ORDERS) == ("workers",)
    assert table.pick(ORDERS, "workers", OrderPlaced(1)) is None
    newcomer = make("workers")
    table.add(newcomer)
    assert table.pick(ORDERS, "workers", OrderPlaced(1)) is newcomer


def test_remove_of_unknown_subscriptions_changes_nothing() -> None:
    table = RouteTable()
    kept = make()
    table.add(kept)
    table.remove(make())
    table.remove(make("workers"))
    table.remove(make(message_type=OrderShipped))
    assert table.broadcast(ORDERS) == (kept,)
    assert table.queue_names(ORDERS) == ()


def test_round_robin_survives_a_member_leaving() -> None:
    table = RouteTable()
    members = [make("workers") for _ in range(3)]
    for member in members:
        table.add(member)
    assert table.pick(ORDERS, "workers", OrderPlaced(1)) is members[0]
    assert table.pick(ORDERS, "workers", OrderPlaced(2)) is members[1]
    table.remove(members[2])
    picks = [table.pick(ORDERS, "workers", OrderPlaced(n)) for n in range(4)]
    assert set(picks) == {members[0], members[1]}
    assert picks[0] is not picks[1]
    assert picks[:2] == picks[2:]  # still alternating


def test_clear_forgets_everything() -> None:
    table = RouteTable()
    table.add(make())
    table.add(make("workers"))
    table.pick(ORDERS, "workers", OrderPlaced(1))
    table.clear()
    assert table.broadcast(ORDERS) == ()
    assert table.queue_names(ORDERS) == ()
    assert table.pick(ORDERS, "workers", OrderPlaced(1)) is None
    first, second = make("workers"), make("workers")
    table.add(first)
    table.add(second)
    assert table.pick(ORDERS, "workers", OrderPlaced(1)) is first  # the cursor restarted too
