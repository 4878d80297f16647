"""StopStrings against the obvious rule, and its cost with the longest stop strings allowed."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from runnel.generation import StopStrings
from runnel.surfaces.openai.params import MAX_STOP, MAX_STOP_CHARS


def _reference(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    """All the text up to the first stop string, and whether one was found."""
    text = "".join(pieces)
    cuts = [text.find(stop) for stop in stops if stop and stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


# A small alphabet, so that stops and partial stops occur often.
_text = st.text(alphabet="ab\n", max_size=6)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(stops=st.lists(st.text(alphabet="ab\n", min_size=0, max_size=5), max_size=4),
       pieces=st.lists(_text, max_size=12))
def test_released_text_is_the_text_before_the_first_stop(stops, pieces):
    _check_released(stops, pieces)


def _check_released(stops: list[str], pieces: list[str]) -> None:
    cutter = StopStrings(stops)
    released = []
    for index, piece in enumerate(pieces):
        released.append(cutter.push(piece))
        # Nothing released can still be the start of a stop string that completes later.
        seen = "".join(released)
        expected_so_far, _ = _reference(stops, pieces[: index + 1])
        assert expected_so_far.startswith(seen)
    released.append(cutter.flush())
    expected, stopped = _reference(stops, pieces)
    assert "".join(released) == expected
    assert cutter.stopped == stopped


@settings(max_examples=400, deadline=None, derandomize=True)
@given(stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
       pieces=st.lists(st.text(alphabet="abxy\n", max_size=4), max_size=14))
def test_text_with_no_stop_start_is_released_unscanned_and_still_right(stops, pieces):
    # "x" and "y" are in no stop: many pieces hold no stop's first character, and those are
    # released without a scan unless text is held back from the pieces before.
    _check_released(stops, pieces)


def test_a_stop_split_over_tokens_completes_in_a_piece_without_its_first_character():
    cutter = StopStrings(["ab", "\nEND"])
    assert [cutter.push(piece) for piece in ("xx", "ya", "by", "zz")] == ["xx", "y", "", ""]
    assert cutter.stopped and cutter.matched == "ab"
    cutter = StopStrings(["\nEND"])
    assert [cutter.push(piece) for piece in ("done", "\n", "EN", "Dx")] == ["done", "", "", ""]
    assert cutter.matched == "\nEND" and cutter.flush() == ""
    # Held back, then ruled out by a piece with no first character: released, in order.
    cutter = StopStrings(["ab"])
    assert [cutter.push(piece) for piece in ("xa", "yy", "zz")] == ["x", "ayy", "zz"]
    assert not cutter.stopped and cutter.flush() == ""


def test_the_longest_stop_strings_cost_microseconds_per_token():
    unit = "lorem ipsum dolor sit amet "
    stops = [(unit * 100)[: MAX_STOP_CHARS - 1] + str(i) for i in range(MAX_STOP)]
    # Output that keeps almost matching every stop, and long pieces that match none of
    # them (hold-back that tries every tail length costs ~MAX_STOP_CHARS**2 for those).
    pieces = [" " + word for word in unit.split()] * 400 + [" " + "xyz" * 400] * 400
    cutter = StopStrings(stops)
    # CPU time, not wall time: a busy machine deschedules the test, which must not fail it.
    # (~4 us here; trying every tail length would cost milliseconds.)
    started = time.process_time()
    for piece in pieces:
        cutter.push(piece)
    per_token = (time.process_time() - started) / len(pieces)
    assert not cutter.stopped
    assert per_token < 50e-6, per_token
