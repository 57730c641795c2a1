"""The dynamic batcher's turns (serving/batcher.py): each request's inputs wait in a line
of their own, and batches take one input of each line in turn, so a request of many
images shares the batches with a one-image request instead of filling them ahead of it;
a batch filled by late arrivals holds max_batch inputs, not one more. A stand-in model
answers 10 x + 1 for input x, without running anything."""
import asyncio

from serving.batcher import DynamicBatcher

TIMEOUT_S = 30  # every wait is bounded: a lost answer fails the test instead of hanging it


class Model:
    """run_batch: records each batch it was given, answers 10 x + 1."""

    def __init__(self):
        self.batches = []

    def __call__(self, items):
        self.batches.append(list(items))
        return [10 * x + 1 for x in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def test_a_big_request_shares_its_batches_with_a_small_one():
    """max_batch 4: request A sends 8 inputs (0..7), then B one input (100), C two (200,
    201), all before the first batch forms. Turns: A, B, C, A, C, A, A, ... by line."""
    async def main():
        model = Model()
        batcher = DynamicBatcher(model, 4, 0.05)
        await batcher.start()
        a, b, c = object(), object(), object()
        tasks = [asyncio.ensure_future(batcher.submit(x, a)) for x in range(8)]
        tasks += [asyncio.ensure_future(batcher.submit(100, b))]
        tasks += [asyncio.ensure_future(batcher.submit(x, c)) for x in (200, 201)]
        got = await asyncio.gather(*tasks)
        await batcher.stop()
        return model, got

    model, got = run(main())
    assert got == [10 * x + 1 for x in [*range(8), 100, 200, 201]]  # every answer its own
    assert model.batches == [[0, 100, 200, 1], [201, 2, 3, 4], [5, 6, 7]]


def test_inputs_without_an_owner_each_take_a_turn_of_their_own():
    async def main():
        model = Model()
        batcher = DynamicBatcher(model, 3, 0.05)
        await batcher.start()
        got = await asyncio.gather(*(batcher.submit(x) for x in range(5)))
        await batcher.stop()
        return model, got

    model, got = run(main())
    assert got == [1, 11, 21, 31, 41] and model.batches == [[0, 1, 2], [3, 4]]


def test_late_arrivals_fill_a_batch_to_max_batch_and_no_further():
    """max_batch 4, a long wait: 2 inputs, then 3 more while the first batch waits: it
    takes 2 of them (4 in all), the third waits for the next batch."""
    async def main():
        model = Model()
        batcher = DynamicBatcher(model, 4, 1.0)
        await batcher.start()
        first = [asyncio.ensure_future(batcher.submit(x, "early")) for x in (0, 1)]
        await asyncio.sleep(0.1)  # the batch has started to wait for more
        late = [asyncio.ensure_future(batcher.submit(x, "late")) for x in (10, 11, 12)]
        got = await asyncio.gather(*first, *late)
        await batcher.stop()
        return model, got

    model, got = run(main())
    assert got == [1, 11, 101, 111, 121]
    assert model.batches == [[0, 1, 10, 11], [12]]
