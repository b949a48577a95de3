"""picopool._eager.shielded: asyncio.shield without a task for work that does not wait.

Pure asyncio: no server. The release path relies on these properties (a
release that waits must still survive its caller's cancellation).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picopool._eager import shielded


def _count_tasks(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Patch *loop* to count the tasks it makes; returns the counter."""
    made = [0]
    original = loop.create_task

    def create_task(coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made[0] += 1
        return original(coro, **kwargs)

    loop.create_task = create_task  # type: ignore[method-assign]
    return made


async def test_a_coroutine_that_does_not_wait_runs_in_the_caller_without_a_task() -> None:
    ran_in: list[asyncio.Task[Any] | None] = []

    async def work() -> int:
        ran_in.append(asyncio.current_task())
        return 42

    made = _count_tasks(asyncio.get_running_loop())
    assert await shielded(work()) == 42
    assert made[0] == 0
    assert ran_in == [asyncio.current_task()]


async def test_its_error_reaches_the_caller() -> None:
    async def work() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await shielded(work())


async def test_a_coroutine_that_waits_finishes_with_its_result_and_errors() -> None:
    async def work(n: int) -> int:
        for _ in range(n):
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        return n

    assert await shielded(work(3)) == 3

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise KeyError("late")

    with pytest.raises(KeyError, match="late"):
        await shielded(fails())


async def test_the_callers_cancellation_does_not_stop_a_coroutine_that_waits() -> None:
    finished = asyncio.Event()
    steps: list[str] = []

    async def release() -> None:
        steps.append("started")
        await asyncio.sleep(0.05)
        steps.append("finished")
        finished.set()

    caller = asyncio.create_task(shielded(release()))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(finished.wait(), 1)
    assert steps == ["started", "finished"]


async def test_a_future_the_coroutine_waits_on_is_awaited_as_a_task_would() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    async def work() -> str:
        return await future

    waiter = asyncio.create_task(shielded(work()))
    await asyncio.sleep(0)
    assert not waiter.done()
    future.set_result("ok")
    assert await waiter == "ok"

    failing: asyncio.Future[str] = loop.create_future()

    async def work_failing() -> str:
        return await failing

    waiter = asyncio.create_task(shielded(work_failing()))
    await asyncio.sleep(0)
    failing.set_exception(OSError("lost"))
    with pytest.raises(OSError, match="lost"):
        await waiter


async def test_a_cancelled_future_cancels_the_inner_coroutine_only() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    seen: list[str] = []

    async def work() -> str:
        try:
            await future
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            return "recovered"
        return "not cancelled"

    waiter = asyncio.create_task(shielded(work()))
    await asyncio.sleep(0)
    future.cancel()
    assert await waiter == "recovered"
    assert seen == ["cancelled inside"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["yield", "sleep", "future"]), max_size=6),
       st.booleans())
def test_any_schedule_of_waits_gives_the_coroutines_own_result(
        waits: list[str], fails: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def work() -> int:
            for kind in waits:
                if kind == "yield":
                    await asyncio.sleep(0)
                elif kind == "sleep":
                    await asyncio.sleep(0.001)
                else:
                    future: asyncio.Future[int] = loop.create_future()
                    loop.call_soon(future.set_result, 1)
                    await future
            if fails:
                raise RuntimeError(len(waits))
            return len(waits)

        made = _count_tasks(loop)
        if fails:
            with pytest.raises(RuntimeError):
                await shielded(work())
        else:
            assert await shielded(work()) == len(waits)
        assert made[0] == (1 if waits else 0)

    asyncio.run(main())
