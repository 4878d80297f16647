"""runnel.simple_model: generators as backends, on a real event loop with a recording sink.

The same adapter serves real requests in tests/e2e (echo, and runnel-markov installed with pip).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from runnel import HTTPError
from runnel.generation import SamplingParams
from runnel.simple_model import END, SimpleModel, WordPieces


class Recorder:
    def __init__(self, choices: int = 1) -> None:
        self.calls: list[tuple] = []
        self.remaining = choices
        self.done = asyncio.get_running_loop().create_future()

    def on_tokens(self, index, text, token_ids, logprobs) -> None:
        assert not self.done.done()
        self.calls.append(("tokens", index, text, list(token_ids)))

    def on_finish(self, index, reason, completion_tokens) -> None:
        self.calls.append(("finish", index, reason, completion_tokens))
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set_result(None)

    def on_error(self, error) -> None:
        self.calls.append(("error", error))
        self.done.set_result(None)

    def text(self, index: int = 0) -> str:
        return "".join(call[2] for call in self.calls if call[0] == "tokens" and call[1] == index)

    def finish(self, index: int = 0):
        (found,) = [call[2:] for call in self.calls if call[0] == "finish" and call[1] == index]
        return found


class Model(SimpleModel):
    """Its generator is whatever the test gives it."""

    supported = frozenset({"stop", "stop_token_ids", "min_tokens", "ignore_eos"})

    def __init__(self, stream) -> None:
        super().__init__("test")
        self._stream = stream

    def stream(self, prompt, params):
        return self._stream(prompt, params)


async def generate(model: SimpleModel, prompt: str, params: SamplingParams, n: int = 1,
                   timeout: float = 10) -> Recorder:
    sink = Recorder(n)
    model.generate(model.tokenize(prompt), params, n, sink)
    await asyncio.wait_for(sink.done, timeout)
    return sink


def test_word_pieces_round_trip_and_stable_ids():
    vocabulary = WordPieces()
    ids = vocabulary.tokenize("  hello big\tworld \n")
    assert [vocabulary.pieces[i] for i in ids] == ["  hello", " big", "\tworld", " \n"]
    assert vocabulary.tokenize("hello big") == [vocabulary.id("hello"), ids[1]]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_text_pieces_stop_string_and_length(kind):
    def words(prompt, params):
        yield from prompt.split(" ")

    async def async_words(prompt, params):
        for word in prompt.split(" "):
            yield word

    stream = words if kind == "sync" else async_words

    async def main():
        model = Model(stream)
        sink = await generate(model, "a b c d e", SamplingParams(max_tokens=3))
        assert (sink.text(), sink.finish()) == ("abc", ("length", 3))
        sink = await generate(model, "a b c d e", SamplingParams(max_tokens=10))
        assert (sink.text(), sink.finish()) == ("abcde", ("stop", 5))  # returned: the model ended
        sink = await generate(model, "x y z w", SamplingParams(max_tokens=10, stop=("yz",)))
        assert (sink.text(), sink.finish()) == ("x", ("stop", 3))
        await model.close()

    asyncio.run(main())


def test_token_ids_end_min_tokens_and_stop_ids():
    async def echo(prompt, params):
        ids = model.tokenize(prompt)
        while True:
            for token_id in ids:
                yield token_id
            yield END

    model = Model(echo)

    async def main():
        sink = await generate(model, "one two", SamplingParams(max_tokens=10))
        assert (sink.text(), sink.finish()) == ("one two", ("stop", 2))
        sink = await generate(model, "one two", SamplingParams(max_tokens=10, min_tokens=3))
        assert (sink.text(), sink.finish()) == ("one twoone two", ("stop", 4))
        sink = await generate(model, "one two", SamplingParams(max_tokens=5, ignore_eos=True))
        assert (sink.text(), sink.finish()) == ("one twoone twoone", ("length", 5))
        (two,) = model.tokenize(" two")
        sink = await generate(model, "one two", SamplingParams(max_tokens=10, stop_token_ids=(two,)))
        assert (sink.text(), sink.finish()) == ("one", ("stop", 2))

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_n_choices_are_independent(kind):
    counter = iter(range(100))

    def numbers(prompt, params):
        start = next(counter) * 10
        for i in range(start, start + 3 + start // 10):  # choice k makes 3 + k pieces
            yield f"{i},"

    async def async_numbers(prompt, params):
        for piece in numbers(prompt, params):
            yield piece

    async def main():
        model = Model(numbers if kind == "sync" else async_numbers)
        sink = await generate(model, "", SamplingParams(max_tokens=4, stop=("21",)), n=3)
        # Each choice ran its own generator; each ended by its own rule.
        texts = sorted(sink.text(index) for index in range(3))
        assert texts == ["0,1,2,", "10,11,12,13,", "20,"]
        by_text = {sink.text(index): sink.finish(index) for index in range(3)}
        assert by_text == {"0,1,2,": ("stop", 3), "10,11,12,13,": ("length", 4), "20,": ("stop", 2)}
        await model.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_cancel_stops_the_generator_and_runs_its_finally(kind):
    state = {"made": 0, "closed": threading.Event()}

    def slow(prompt, params):
        try:
            while True:
                state["made"] += 1
                yield "x"
                time.sleep(0.01)
        finally:
            state["closed"].set()

    async def async_slow(prompt, params):
        try:
            while True:
                state["made"] += 1
                yield "x"
                await asyncio.sleep(0.01)
        finally:
            state["closed"].set()

    async def main():
        model = Model(slow if kind == "sync" else async_slow)
        sink = Recorder()
        generation = model.generate([], SamplingParams(max_tokens=100_000), 1, sink)
        while sink.text().count("x") < 3:
            await asyncio.sleep(0.005)
        generation.cancel()
        generation.cancel()  # safe twice
        for _ in range(200):
            if state["closed"].is_set():
                break
            await asyncio.sleep(0.01)
        assert state["closed"].is_set()
        made = state["made"]
        await asyncio.sleep(0.1)
        assert state["made"] == made < 100  # it made nothing more
        assert not sink.done.done()  # a cancelled generation reports nothing more
        assert all(call[0] == "tokens" for call in sink.calls)
        await model.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_generator_that_raises_is_an_error_after_its_pieces(kind):
    def broken(prompt, params):
        yield "fine"
        raise RuntimeError("the model broke")

    async def async_broken(prompt, params):
        yield "fine"
        raise RuntimeError("the model broke")

    async def main():
        model = Model(broken if kind == "sync" else async_broken)
        sink = await generate(model, "", SamplingParams(max_tokens=10), n=2)
        errors = [call[1] for call in sink.calls if call[0] == "error"]
        assert len(errors) == 1  # once per generation, not per choice
        assert isinstance(errors[0], RuntimeError) and str(errors[0]) == "the model broke"
        assert sink.calls[-1][0] == "error"
        assert not any(call[0] == "finish" for call in sink.calls)
        await model.close()

    asyncio.run(main())


def test_an_http_error_from_the_generator_reaches_the_sink_as_it_is():
    async def refuse(prompt, params):
        raise HTTPError(400, "no such thing", param="prompt")
        yield  # pragma: no cover (makes it an async generator)

    async def main():
        sink = await generate(Model(refuse), "", SamplingParams())
        ((_, error),) = sink.calls
        assert isinstance(error, HTTPError) and error.status == 400

    asyncio.run(main())


def test_a_sync_generator_does_not_block_the_loop():
    def blocking(prompt, params):
        for _ in range(5):
            time.sleep(0.05)  # a blocking model call
            yield "x"

    async def main():
        model = Model(blocking)
        ticks = []

        async def heartbeat():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        beat = asyncio.get_running_loop().create_task(heartbeat())
        sink = await generate(model, "", SamplingParams(max_tokens=10))
        beat.cancel()
        assert (sink.text(), sink.finish()) == ("xxxxx", ("stop", 5))
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        assert len(ticks) > 20 and max(gaps) < 0.04, (len(ticks), max(gaps))
        await model.close()

    asyncio.run(main())


def test_an_async_generator_that_never_awaits_still_lets_the_loop_run():
    async def eager(prompt, params):
        while True:
            yield "x"

    async def main():
        ran = []
        asyncio.get_running_loop().call_soon(ran.append, True)
        sink = Recorder()
        Model(eager).generate([], SamplingParams(max_tokens=1000), 1, sink)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert ran and not sink.done.done()  # the other callback ran while the choice was mid-way
        await asyncio.wait_for(sink.done, 5)
        assert sink.finish() == ("length", 1000)

    asyncio.run(main())


def test_a_sync_generator_stops_at_max_tokens_on_its_thread():
    state = {"made": 0, "closed": threading.Event()}

    def endless(prompt, params):
        try:
            while True:
                state["made"] += 1
                yield "x"
        finally:
            state["closed"].set()

    async def main():
        model = Model(endless)
        sink = await generate(model, "", SamplingParams(max_tokens=50))
        assert sink.finish() == ("length", 50)
        assert state["closed"].wait(5)
        assert state["made"] == 50  # the thread ran no further than the choice could use
        await model.close()

    asyncio.run(main())


def test_nothing_reaches_the_sink_inside_generate():
    def instant(prompt, params):
        yield "x"

    async def main():
        sink = Recorder()
        Model(instant).generate([], SamplingParams(), 1, sink)
        assert sink.calls == []
        await asyncio.wait_for(sink.done, 5)
        assert sink.finish() == ("stop", 1)

    asyncio.run(main())


def test_an_error_after_the_choice_ended_is_not_reported():
    def stops_then_breaks(prompt, params):
        yield "done!"
        time.sleep(0.2)  # the loop ends the choice on the stop string meanwhile
        raise RuntimeError("too late to matter")

    async def main():
        model = Model(stops_then_breaks)
        sink = await generate(model, "", SamplingParams(max_tokens=10, stop=("!",)))
        await asyncio.sleep(0.4)
        assert [call[0] for call in sink.calls] == ["tokens", "finish"]
        assert (sink.text(), sink.finish()) == ("done", ("stop", 1))
        await model.close()

    asyncio.run(main())
