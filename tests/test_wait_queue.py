"""The waiter queue (``max_waiting=`` and prefer_replicas' spill queue) as pure
logic: fake members with a number of free connections, no server."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from picopool._admission import _LOOK_AGAIN, WaitQueue, _look_again


class FakeMember:
    def __init__(self, free: int) -> None:
        self.free = free  # connections neither in use nor reserved... before reservations
        self.reserved = 0


def queue_over(member: FakeMember, max_waiting: int = 100) -> WaitQueue:
    def free_member(request: Any) -> FakeMember | None:
        return member if member.free - member.reserved > 0 else None

    return WaitQueue(max_waiting, free_member)


async def turns_until_done(task: asyncio.Task[Any]) -> int:
    turns = 0
    while not task.done():
        await asyncio.sleep(0)
        turns += 1
    return turns


async def test_a_grant_wakes_its_waiter_in_one_turn_of_the_loop() -> None:
    """As a waiter of asyncpg's own queue: the grant's future is what it awaits
    (through asyncio.wait it took two turns, and a connection sat reserved
    and unused meanwhile)."""
    member = FakeMember(free=0)
    queue = queue_over(member)
    waiter = asyncio.create_task(queue.admit("read", None))
    await asyncio.sleep(0)
    assert queue.waiting == 1
    member.free = 1
    queue.dispatch()
    assert member.reserved == 1
    assert await turns_until_done(waiter) == 1
    assert waiter.result() is member


async def test_a_grant_made_while_the_poll_timer_wakes_the_waiter_is_kept() -> None:
    member = FakeMember(free=0)
    queue = queue_over(member)
    task = asyncio.create_task(queue.admit("read", None))
    await asyncio.sleep(0)
    [waiter] = queue._queues["read"]
    polled = waiter.future
    _look_again(waiter)  # the timer fires...
    assert polled.result() is _LOOK_AGAIN and not waiter.future.done()
    member.free = 1
    queue.dispatch()  # ...and a connection comes back before the waiter runs again
    assert await task is member
    assert (member.reserved, queue.waiting) == (1, 0)


async def test_a_waiter_cancelled_after_its_grant_passes_the_reservation_on() -> None:
    member = FakeMember(free=0)
    queue = queue_over(member)
    first = asyncio.create_task(queue.admit("read", None))
    await asyncio.sleep(0)
    second = asyncio.create_task(queue.admit("read", None))
    await asyncio.sleep(0)
    member.free = 1
    queue.dispatch()  # granted to the first...
    first.cancel()  # ...which is cancelled before it could use it
    assert await second is member
    assert first.cancelled()
    assert (member.reserved, queue.waiting) == (1, 0)


async def test_a_waiter_times_out_without_a_grant() -> None:
    member = FakeMember(free=0)
    queue = queue_over(member)
    try:
        await queue.admit("read", 0.05)
    except TimeoutError:
        pass
    else:
        raise AssertionError("no TimeoutError")
    assert (member.reserved, queue.waiting) == (0, 0)


# Each step: a caller arrives, a connection comes back, a waiter is cancelled, a
# poll timer fires, or the loop turns.
STEP = st.one_of(
    st.just(("arrive", 0)), st.just(("free", 0)), st.just(("turn", 0)),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("poll"), st.integers(0, 30)),
)


@settings(deadline=None, max_examples=150)
@given(st.lists(STEP, max_size=60))
def test_grants_follow_arrival_and_reservations_balance(steps: list[tuple[str, int]]) -> None:
    """Whatever the schedule: callers are served in arrival order (among those
    not cancelled), no connection is reserved twice, a cancelled caller holds
    no reservation, and each served caller holds exactly one."""

    async def scenario() -> None:
        member = FakeMember(free=0)
        queue = queue_over(member)
        callers: list[asyncio.Task[Any]] = []
        served: list[int] = []

        async def caller(n: int) -> None:
            await queue.admit("read", None)
            served.append(n)

        for action, index in steps:
            if action == "arrive":
                callers.append(asyncio.create_task(caller(len(callers))))
            elif action == "free":
                member.free += 1
                queue.dispatch()
            elif action == "cancel" and callers:
                callers[index % len(callers)].cancel()
            elif action == "poll":
                waiters = [w for q in queue._queues.values() for w in q]
                if waiters:
                    _look_again(waiters[index % len(waiters)])
            await asyncio.sleep(0)
            assert member.reserved <= member.free
        for _ in range(5):
            await asyncio.sleep(0)
        assert served == sorted(served)  # FIFO among the served
        assert member.reserved == len(served) <= member.free
        waiting = [t for t in callers if not t.done()]
        assert queue.waiting == len(waiting)
        # nobody still waiting could have been served: every connection is reserved
        assert not waiting or member.reserved == member.free
        for task in waiting:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        assert queue.waiting == 0

    asyncio.run(scenario())
