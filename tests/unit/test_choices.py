"""runnel.choices.Choice: the per-choice rules every backend shares, pushed into a recording sink."""

from __future__ import annotations

from runnel.choices import Choice
from runnel.generation import SamplingParams


class Recorder:
    """A TokenSink that keeps every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_tokens(self, index, text, token_ids, logprobs) -> None:
        self.calls.append(("tokens", index, text, list(token_ids), logprobs))

    def on_finish(self, index, reason, completion_tokens) -> None:
        self.calls.append(("finish", index, reason, completion_tokens))

    def on_error(self, error) -> None:
        self.calls.append(("error", error))

    def text(self, index: int = 0) -> str:
        return "".join(call[2] for call in self.calls if call[0] == "tokens" and call[1] == index)

    def finish(self, index: int = 0) -> tuple[str, int]:
        (found,) = [call[2:] for call in self.calls if call[0] == "finish" and call[1] == index]
        return found


def run(params: SamplingParams, tokens, **options) -> tuple[Recorder, Choice]:
    """Consume (id, piece) pairs one by one, emitting after each, until the choice is done."""
    sink = Recorder()
    choice = Choice(sink, 0, params, **options)
    for token_id, piece in tokens:
        choice.consume(token_id, piece)
        if choice.done:
            break
        choice.emit()
    return sink, choice


WORDS = [(10, "one"), (11, " two"), (12, " three"), (13, " four"), (14, " five"), (15, " six")]


def test_max_tokens_ends_with_length():
    sink, choice = run(SamplingParams(max_tokens=3), WORDS)
    assert sink.text() == "one two three"
    assert sink.finish() == ("length", 3)
    assert choice.done


def test_stop_id_ends_with_stop_counted_but_not_sent():
    sink, _ = run(SamplingParams(max_tokens=10, stop_token_ids=(12,)), WORDS)
    assert sink.text() == "one two"
    assert sink.finish() == ("stop", 3)
    assert all(12 not in call[3] for call in sink.calls if call[0] == "tokens")


def test_min_tokens_holds_a_stop_id_inside_the_minimum():
    tokens = [(10, "a"), (99, " X"), (11, " b"), (99, " X"), (12, " c")]
    sink, _ = run(SamplingParams(max_tokens=10, stop_token_ids=(99,), min_tokens=2), tokens)
    # The first stop id is the 2nd token: inside the minimum, so it is an ordinary token.
    # The second is the 4th: past the minimum, it ends the choice.
    assert sink.text() == "a X b"
    assert sink.finish() == ("stop", 4)
    # At the edge: a stop id may be the (min_tokens + 1)-th token at the earliest.
    sink, _ = run(SamplingParams(max_tokens=10, stop_token_ids=(99,), min_tokens=1), tokens)
    assert (sink.text(), sink.finish()) == ("a", ("stop", 2))


def test_eos_ends_unless_ignore_eos_and_waits_for_min_tokens():
    tokens = [(10, "a"), (2, "</s>"), (11, " b"), (2, "</s>")]
    sink, _ = run(SamplingParams(max_tokens=10), tokens, eos_id=2)
    assert (sink.text(), sink.finish()) == ("a", ("stop", 2))
    sink, _ = run(SamplingParams(max_tokens=10, min_tokens=2), tokens, eos_id=2)
    assert (sink.text(), sink.finish()) == ("a</s> b", ("stop", 4))
    sink, _ = run(SamplingParams(max_tokens=4, ignore_eos=True), tokens, eos_id=2)
    assert (sink.text(), sink.finish()) == ("a</s> b</s>", ("length", 4))


def test_end_respects_min_tokens_and_ignore_eos():
    sink = Recorder()
    choice = Choice(sink, 0, SamplingParams(max_tokens=10, min_tokens=2))
    choice.consume(1, "a")
    assert choice.end() is False and not choice.done  # 1 token < min_tokens: the model goes on
    choice.consume(2, " b")
    assert choice.end() is True
    assert (sink.text(), sink.finish()) == ("a b", ("stop", 2))  # the end is not a token
    choice = Choice(Recorder(), 0, SamplingParams(ignore_eos=True))
    choice.consume(1, "a")
    assert choice.end() is False and not choice.done


def test_stop_string_spanning_pieces():
    tokens = [(1, "hello"), (2, " wor"), (3, "ld and"), (4, " more")]
    sink, _ = run(SamplingParams(max_tokens=10, stop=("world",)), tokens)
    assert sink.text() == "hello "
    assert sink.finish() == ("stop", 3)
    # " wor" was held back while it could still become the stop string: never sent.
    assert [call[2] for call in sink.calls if call[0] == "tokens" and call[2]] == ["hello", " "]


def test_stop_string_completed_by_the_last_allowed_token_is_stop_not_length():
    tokens = [(1, "a"), (2, " b"), (3, "!")]
    sink, _ = run(SamplingParams(max_tokens=3, stop=("!",)), tokens)
    assert sink.finish() == ("stop", 3)
    sink, _ = run(SamplingParams(max_tokens=3, stop_token_ids=(3,)), tokens)
    assert sink.finish() == ("stop", 3)
    sink, _ = run(SamplingParams(max_tokens=3, stop=("?",)), tokens)
    assert (sink.text(), sink.finish()) == ("a b!", ("length", 3))


def test_held_back_text_is_released_at_length():
    sink, _ = run(SamplingParams(max_tokens=2, stop=("STOP",)), [(1, "go"), (2, " ST"), (3, "OP")])
    assert sink.text() == "go ST"
    assert sink.finish() == ("length", 2)


class HoldLast:
    """A detokenizer that holds each piece back until the next id (as a partial character is)."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces
        self.held = ""

    def push(self, token_id: int) -> str:
        out, self.held = self.held, self.pieces[token_id]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def test_flush_order_detokenizer_then_stop_strings():
    # Stop string "AB": the stop strings hold "A" back, the detokenizer holds "B". At the end
    # the detokenizer's text goes through the stop strings first, so "AB" is found and never
    # sent; flushing the stop strings first would leak "A" and then "B".
    detokenizer = HoldLast({1: "x", 2: "A", 3: "B"})
    sink = Recorder()
    choice = Choice(sink, 0, SamplingParams(max_tokens=3, stop=("AB",)), detokenizer=detokenizer)
    for token_id in (1, 2, 3):
        choice.consume(token_id, "ignored: the detokenizer makes the text")
    assert sink.text() == "x"
    assert sink.finish() == ("length", 3)


def test_flush_after_a_stop_id_releases_what_was_held():
    detokenizer = HoldLast({1: "a", 2: " S", 9: ""})
    sink = Recorder()
    choice = Choice(sink, 0, SamplingParams(max_tokens=5, stop=("STOP",), stop_token_ids=(9,)),
                    detokenizer=detokenizer)
    for token_id in (1, 2, 9):
        choice.consume(token_id)
    assert (sink.text(), sink.finish()) == ("a S", ("stop", 3))


def test_a_burst_is_one_push_and_finish_emits_what_is_pending():
    sink = Recorder()
    choice = Choice(sink, 3, SamplingParams(max_tokens=5))
    for token_id, piece in WORDS[:3]:
        choice.consume(token_id, piece)
    assert sink.calls == []  # nothing before emit
    choice.emit()
    assert sink.calls == [("tokens", 3, "one two three", [10, 11, 12], None)]
    choice.emit()
    assert len(sink.calls) == 1  # nothing new: no empty push
    choice.consume(13, " four")
    choice.consume(14, " five")
    assert sink.calls[1:] == [("tokens", 3, " four five", [13, 14], None), ("finish", 3, "length", 5)]


def test_logprobs_per_token_with_top_logprobs():
    sink = Recorder()
    choice = Choice(sink, 0, SamplingParams(max_tokens=2, logprobs=True, top_logprobs=1))
    choice.consume(1, "a", -0.5)
    choice.consume(2, " b", None)
    (_, _, text, ids, logprobs), _ = sink.calls
    assert (text, ids) == ("a b", [1, 2])
    assert [(lp.token, lp.logprob, list(lp.top)) for lp in logprobs] == [
        ("a", -0.5, [("a", -0.5)]), (" b", 0.0, [(" b", 0.0)])]
    sink, _ = run(SamplingParams(max_tokens=2, logprobs=True), WORDS)
    assert [list(lp.top) for call in sink.calls if call[0] == "tokens" for lp in call[4]] == [[], []]


def test_nothing_is_pushed_after_finish():
    sink = Recorder()
    choice = Choice(sink, 0, SamplingParams(max_tokens=1))
    choice.consume(1, "a")
    assert choice.done
    choice.emit()
    assert [call[0] for call in sink.calls] == ["tokens", "finish"]
