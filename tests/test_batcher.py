"""The service's dynamic batcher (serving/batcher.py) with a stand-in model whose answer
to an input is known without running it (input x -> 10 x + 1): every request gets the
answer to its own input, however requests are grouped, cancelled (a client that went
away) before or while their batch runs, in every position of the batch; max_batch at,
below and one past the number waiting; a failing batch; stop()."""
import asyncio
import threading

import pytest

from serving.batcher import BatcherStopped, DynamicBatcher

TIMEOUT_S = 30  # every wait is bounded: a lost answer fails the test instead of hanging it


def answer(x):
    return 10 * x + 1


class Model:
    """run_batch: records each batch it was given; can be held (a batch in the network)
    until released."""

    def __init__(self, fail_on=None):
        self.batches, self.fail_on = [], fail_on
        self.started, self.release = threading.Event(), threading.Event()
        self.release.set()

    def __call__(self, items):
        self.batches.append(list(items))
        self.started.set()
        assert self.release.wait(TIMEOUT_S)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"batch with {self.fail_on} failed")
        return [answer(x) for x in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


async def started(model, max_batch, max_wait_s=0.2):
    batcher = DynamicBatcher(model, max_batch, max_wait_s)
    await batcher.start()
    return batcher


@pytest.mark.parametrize("n,max_batch,sizes", [
    (6, 1, [1] * 6), (6, 5, [5, 1]), (6, 6, [6]), (6, 7, [6]), (7, 3, [3, 3, 1]), (1, 1, [1])])
def test_each_request_gets_its_own_answer_in_batches_of_max_batch(n, max_batch, sizes):
    """n requests arriving together: batches of max_batch (at, below and one past n), in
    arrival order, each answer its own."""
    async def main():
        model = Model()
        batcher = await started(model, max_batch)
        got = await asyncio.gather(*(batcher.submit(x) for x in range(n)))
        await batcher.stop()
        return model, got

    model, got = run(main())
    assert got == [answer(x) for x in range(n)]
    assert [len(b) for b in model.batches] == sizes
    assert [x for b in model.batches for x in b] == list(range(n))


@pytest.mark.parametrize("cancelled", [(0,), (1,), (2,), (3,), (0, 3), (1, 2), (0, 1, 2)])
def test_requests_cancelled_while_queued_in_every_position(cancelled):
    """Four requests wait for one batch; those at `cancelled` go away before it runs: the
    model never sees their inputs, and every other request gets its own answer."""
    async def main():
        model = Model()
        batcher = await started(model, max_batch=8, max_wait_s=0.3)  # the batch waits: time to cancel
        tasks = [asyncio.create_task(batcher.submit(x)) for x in range(4)]
        await asyncio.sleep(0.05)
        for k in cancelled:
            tasks[k].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return model, results

    model, results = run(main())
    for k, result in enumerate(results):
        if k in cancelled:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == answer(k), (k, results)
    assert model.batches == [[k for k in range(4) if k not in cancelled]]


@pytest.mark.parametrize("cancelled", [0, 1, 2, 3])
def test_a_request_cancelled_while_its_batch_runs(cancelled):
    """The batch is in the network when one request goes away: the others still get their
    own answers, and the next batch is served."""
    async def main():
        model = Model()
        model.release.clear()
        batcher = await started(model, max_batch=4, max_wait_s=0.3)
        tasks = [asyncio.create_task(batcher.submit(x)) for x in range(4)]
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, TIMEOUT_S)
        tasks[cancelled].cancel()
        later = asyncio.create_task(batcher.submit(99))  # queued behind the running batch
        await asyncio.sleep(0.05)
        model.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        after = await later
        await batcher.stop()
        return model, results, after

    model, results, after = run(main())
    assert isinstance(results[cancelled], asyncio.CancelledError)
    assert [r for k, r in enumerate(results) if k != cancelled] == [answer(k) for k in range(4) if k != cancelled]
    assert after == answer(99)
    assert model.batches == [[0, 1, 2, 3], [99]]


def test_a_batch_whose_requests_all_went_away_is_not_run():
    async def main():
        model = Model()
        batcher = await started(model, max_batch=8, max_wait_s=0.3)
        gone = [asyncio.create_task(batcher.submit(x)) for x in range(3)]
        await asyncio.sleep(0.05)
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        await asyncio.sleep(0.4)  # past the batch's wait: it was dropped
        kept = await asyncio.gather(batcher.submit(7), batcher.submit(8))
        await batcher.stop()
        return model, kept

    model, kept = run(main())
    assert kept == [answer(7), answer(8)]
    assert model.batches == [[7, 8]]


def test_a_failing_batch_fails_its_requests_only():
    async def main():
        model = Model(fail_on=2)
        batcher = await started(model, max_batch=3)
        first = await asyncio.gather(*(batcher.submit(x) for x in range(3)), return_exceptions=True)
        second = await asyncio.gather(*(batcher.submit(x) for x in range(3, 6)))
        await batcher.stop()
        return first, second

    first, second = run(main())
    assert all(isinstance(r, RuntimeError) and "batch with 2 failed" in str(r) for r in first)
    assert second == [answer(x) for x in range(3, 6)]


def test_stop_answers_what_is_queued_then_refuses():
    async def main():
        model = Model()
        model.release.clear()
        batcher = await started(model, max_batch=2, max_wait_s=0.0)
        tasks = [asyncio.create_task(batcher.submit(x)) for x in range(5)]
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, TIMEOUT_S)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        with pytest.raises(BatcherStopped):
            await batcher.submit(9)
        model.release.set()
        await stopping
        return model, await asyncio.gather(*tasks)

    model, results = run(main())
    assert results == [answer(x) for x in range(5)]
    assert [len(b) for b in model.batches] == [2, 2, 1]


@pytest.mark.parametrize("max_batch,max_wait_s", [(0, 0.1), (1, -0.001)])
def test_bad_limits_are_refused(max_batch, max_wait_s):
    with pytest.raises(ValueError):
        DynamicBatcher(Model(), max_batch, max_wait_s)
    DynamicBatcher(Model(), 1, 0.0)  # the edges themselves are allowed
