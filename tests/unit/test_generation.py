"""runnel.generation: StopStrings, unsupported() and SamplingParams defaults."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from runnel.generation import REQUIRED_PARAMETERS, SamplingParams, StopStrings, unsupported


def run(stops, pieces) -> tuple[list[str], str, bool]:
    """Push ``pieces`` one by one; returns what each push released, what flush released, stopped."""
    cutter = StopStrings(stops)
    released = [cutter.push(piece) for piece in pieces]
    return released, cutter.flush(), cutter.stopped


# -- StopStrings ---------------------------------------------------------------------------


def test_stop_inside_a_single_push():
    released, rest, stopped = run(["STOP"], ["abcSTOPdef"])
    assert released == ["abc"]
    assert rest == ""
    assert stopped


def test_stop_across_two_pushes():
    released, rest, stopped = run(["STOP"], ["hello ST", "OP world"])
    assert released == ["hello ", ""]
    assert "".join(released) + rest == "hello "
    assert stopped


def test_stop_across_three_pushes():
    released, rest, stopped = run(["a b c"], ["x", " a", " b", " c", " d"])
    # " a" and " b" could still grow into the stop string: held back, never released.
    assert released == ["x", " ", "", "", ""]
    assert rest == ""
    assert stopped


def test_stop_across_many_single_character_pushes():
    text = "the quick brown fox"
    released, rest, stopped = run(["brown"], list(text))
    assert "".join(released) == "the quick "
    assert rest == ""
    assert stopped
    # Nothing of the stop string ever came out, not even its first letter.
    assert all("b" not in piece for piece in released)


def test_pushes_after_stop_release_nothing():
    cutter = StopStrings(["."])
    assert cutter.push("one. two") == "one"
    assert cutter.stopped
    assert cutter.push(" three") == ""
    assert cutter.push(".") == ""
    assert cutter.flush() == ""


def test_multiple_stops_earliest_wins():
    released, rest, stopped = run(["world", "lo"], ["hello world"])
    assert released == ["hel"]
    assert stopped
    # Order in the list does not matter: position in the text does.
    assert run(["lo", "world"], ["hello world"])[0] == ["hel"]


def test_multiple_stops_earliest_wins_across_pushes():
    # "ABC" is held while it could still become "ABCD"; once "X" arrives it cannot, so it is
    # released, and "XY" then stops the text.
    released, rest, stopped = run(["ABCD", "XY"], ["AB", "C", "X", "Y"])
    assert "".join(released) == "ABC"
    assert stopped
    assert rest == ""


def test_held_back_text_released_by_flush():
    released, rest, stopped = run(["STOP"], ["hello S", "T"])
    assert released == ["hello ", ""]
    assert rest == "ST"
    assert not stopped
    assert "".join(released) + rest == "hello ST"


def test_held_back_text_released_when_it_stops_matching():
    released, rest, stopped = run(["STOP"], ["ab ST", "Ox"])
    assert released == ["ab ", "STOx"]
    assert rest == ""
    assert not stopped


def test_hold_back_retries_shorter_suffixes():
    # "xa": only the tail "a" could grow into "abc", so "x" is released and "a" held.
    released, rest, stopped = run(["abc"], ["xa", "b", "c"])
    assert released == ["x", "", ""]
    assert stopped
    released, rest, stopped = run(["abc"], ["xa", "b", "d"])
    assert "".join(released) + rest == "xabd"
    assert not stopped


def test_stop_at_the_very_start():
    released, rest, stopped = run(["STOP"], ["STOP and more"])
    assert released == [""]
    assert stopped
    released, rest, stopped = run(["STOP"], ["S", "T", "O", "P", "x"])
    assert released == ["", "", "", "", ""]
    assert rest == ""
    assert stopped


def test_empty_stop_list_fast_path():
    cutter = StopStrings([])
    pieces = ["a", " b", "", " c\n"]
    assert [cutter.push(piece) for piece in pieces] == pieces
    assert cutter.flush() == ""
    assert not cutter.stopped


def test_empty_strings_in_stop_list_are_ignored():
    cutter = StopStrings(["", ""])
    assert cutter.push("anything") == "anything"
    assert not cutter.stopped
    released, rest, stopped = run(["", "!"], ["hi", "!", "there"])
    assert released == ["hi", "", ""]
    assert stopped


def test_stop_string_that_is_a_prefix_of_another():
    # "ab" completes as soon as it appears; the longer "abc" cannot win at the same spot.
    released, rest, stopped = run(["abc", "ab"], ["x", "a", "b", "c"])
    assert "".join(released) == "x"
    assert stopped
    # The shorter one completing ends generation even while the longer is still possible.
    cutter = StopStrings(["abc", "ab"])
    assert cutter.push("xa") == "x"
    assert cutter.push("b") == ""
    assert cutter.stopped


def test_longer_stop_earlier_in_text_beats_shorter_later():
    released, rest, stopped = run(["bcd", "d"], ["abcde"])
    assert released == ["a"]
    assert stopped


def test_no_stop_text_is_lost_without_a_match():
    text = "lorem ipsum dolor sit amet, consectetur"
    for stops in (["amet!"], ["sit amen"], ["zzz", "r,"]):
        cutter = StopStrings(stops)
        out = "".join(cutter.push(ch) for ch in text) + cutter.flush()
        assert not cutter.stopped
        assert out == text


# -- unsupported() -----------------------------------------------------------------------------


def test_unsupported_none_for_defaults():
    assert unsupported(SamplingParams(), frozenset()) is None


def test_unsupported_ignores_required_parameters():
    assert "max_tokens" in REQUIRED_PARAMETERS
    assert unsupported(SamplingParams(max_tokens=999), frozenset()) is None


def test_unsupported_names_a_non_default_parameter():
    assert unsupported(SamplingParams(presence_penalty=0.5), frozenset()) == "presence_penalty"
    assert unsupported(SamplingParams(repetition_penalty=1.2), frozenset({"presence_penalty"})) == "repetition_penalty"
    assert unsupported(SamplingParams(stop=("x",)), frozenset()) == "stop"
    assert unsupported(SamplingParams(seed=0), frozenset()) == "seed"  # 0 is not the default None


def test_unsupported_none_when_supported():
    params = SamplingParams(temperature=0.0, top_p=0.5, frequency_penalty=1.0)
    assert unsupported(params, frozenset({"temperature", "top_p", "frequency_penalty"})) is None


def test_unsupported_returns_the_first_in_field_order():
    params = SamplingParams(min_tokens=3, temperature=0.5, frequency_penalty=1.0)
    assert unsupported(params, frozenset()) == "temperature"
    assert unsupported(params, frozenset({"temperature"})) == "frequency_penalty"
    assert unsupported(params, frozenset({"temperature", "frequency_penalty"})) == "min_tokens"


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.0}, {"top_p": 0.9}, {"top_k": 5}, {"seed": 7}, {"stop": ("\n",)},
        {"stop_token_ids": (2,)}, {"logprobs": True}, {"top_logprobs": 2}, {"presence_penalty": -1.0},
        {"frequency_penalty": 0.1}, {"repetition_penalty": 0.9}, {"ignore_eos": True}, {"min_tokens": 1},
    ],
)
def test_unsupported_every_optional_field(change):
    (name,) = change
    params = replace(SamplingParams(), **change)
    assert unsupported(params, frozenset()) == name
    assert unsupported(params, frozenset({name})) is None


def test_a_deadline_is_not_a_parameter_a_backend_must_support():
    # A backend that never checks it still serves the request (runnel.generation.SamplingParams.deadline).
    assert unsupported(SamplingParams(deadline=123.0), frozenset()) is None


def test_expired_while_waiting_only_once_the_deadline_has_passed():
    import time

    from runnel.generation import expired_while_waiting

    assert expired_while_waiting(SamplingParams()) is None
    assert expired_while_waiting(SamplingParams(deadline=time.monotonic() + 60)) is None
    error = expired_while_waiting(SamplingParams(deadline=time.monotonic() - 0.001))
    assert error is not None and (error.status, error.code, error.headers) == (504, "deadline_exceeded", ())


# -- SamplingParams --------------------------------------------------------------------------


def test_sampling_params_defaults():
    params = SamplingParams()
    assert params.max_tokens == 16
    assert params.temperature == 1.0
    assert params.top_p == 1.0
    assert params.top_k == -1
    assert params.seed is None
    assert params.stop == ()
    assert params.stop_token_ids == ()
    assert params.logprobs is False
    assert params.top_logprobs == 0
    assert params.presence_penalty == 0.0
    assert params.frequency_penalty == 0.0
    assert params.repetition_penalty == 1.0
    assert params.no_repeat_ngram_size == 0
    assert params.ignore_eos is False
    assert params.min_tokens == 0
    assert params.response_format is None
    assert params.logit_bias == ()
    assert params.tool_call is None
    assert params.deadline is None
    assert {item.name for item in fields(SamplingParams)} == {
        "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "logprobs",
        "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "no_repeat_ngram_size",
        "ignore_eos", "min_tokens", "response_format", "logit_bias", "tool_call", "deadline",
    }


def test_sampling_params_keyword_only_and_slotted():
    with pytest.raises(TypeError):
        SamplingParams(32)  # type: ignore[misc]
    params = SamplingParams(max_tokens=4)
    with pytest.raises(AttributeError):
        params.not_a_field = 1  # type: ignore[attr-defined]
