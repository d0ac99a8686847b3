"""Registry.watch_batches' tick: a cancelled consumer always ends, even while events keep arriving."""

from __future__ import annotations

import asyncio

import pytest

from moemesh.control.etcd import next_batch

pytestmark = pytest.mark.unit


def test_batches_take_what_is_queued_or_tick_empty():
    async def main():
        q: asyncio.Queue = asyncio.Queue()
        assert await next_batch(q, 0.01) == []
        for i in range(3):
            q.put_nowait(i)
        assert await next_batch(q, 0.01) == [0, 1, 2]
        asyncio.get_running_loop().call_later(0.01, q.put_nowait, "late")
        assert await next_batch(q, 10) == ["late"]

    asyncio.run(main())


def test_a_cancellation_is_never_swallowed_while_events_arrive():
    # asyncio.wait_for (Python < 3.12) returns the item and drops a cancellation that lands with it: a
    # consumer looping on it would never end. Cancel consumers at every phase of a busy producer.
    async def consumer(q):
        while True:
            await next_batch(q, 0.001)

    async def main():
        q: asyncio.Queue = asyncio.Queue()
        for i in range(300):
            task = asyncio.create_task(consumer(q))
            for _ in range(i % 4):
                await asyncio.sleep(0)
            q.put_nowait(i)  # the item and the cancellation arrive in the same loop iteration
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=30)  # a hang detector, not a budget
            assert task in done and task.cancelled(), f"consumer {i} went on after its cancellation"

    asyncio.run(main())
