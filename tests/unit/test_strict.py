"""check_head and ChunkedBodyChecker: the raw-byte checks run beside h11."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runnel.http.strict import ChunkedBodyChecker, check_head

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"  # 27 bytes


# --- check_head ------------------------------------------------------------------


def test_complete_head_within_the_limit_passes():
    assert check_head(HEAD, 16384) is None


def test_complete_head_of_exactly_the_limit_passes_and_one_more_byte_is_431():
    assert len(HEAD) == 27
    assert check_head(HEAD, 27) is None
    assert check_head(HEAD, 26) == (431, "request header block too large")


def test_incomplete_head_within_the_limit_waits():
    assert check_head(b"GET / HTTP/1.1\r\nHost: x\r\n", 16384) is None
    assert check_head(b"G", 1) is None


def test_incomplete_head_past_the_limit_is_431():
    partial = b"GET / HTTP/1.1\r\nX: " + b"a" * 100
    assert check_head(partial, len(partial)) is None
    assert check_head(partial, len(partial) - 1) == (431, "request header block too large")


def test_the_limit_counts_the_head_only_not_the_body_after_it():
    buffer = HEAD + b"x" * 1000
    assert check_head(buffer, len(HEAD)) is None


def test_bare_lf_head_end_is_recognised():
    head = b"GET / HTTP/1.1\nHost: x\n\n"
    assert check_head(head, len(head)) is None
    assert check_head(head, len(head) - 1) == (431, "request header block too large")


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: one\r\n\ttwo\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: x\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\nX-A: one\n two\n\n",
    ],
)
def test_obs_fold_is_400(head):
    assert check_head(head, 16384) == (400, "obsolete line folding in header")


def test_obs_fold_in_an_incomplete_head_is_not_judged_yet():
    assert check_head(b"GET / HTTP/1.1\r\nX-A: one\r\n two", 16384) is None


def test_fold_like_bytes_in_the_body_after_the_head_are_not_obs_fold():
    assert check_head(HEAD + b"\n body\n\tmore", 16384) is None
    assert check_head(HEAD + b" leading space", 16384) is None


def test_size_is_checked_before_obs_fold():
    head = b"GET / HTTP/1.1\r\nX-A: one\r\n two\r\n\r\n"
    assert check_head(head, 10) == (431, "request header block too large")


# --- ChunkedBodyChecker ------------------------------------------------------------

VALID_BODIES = [
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
    b"5;name=value\r\nhello\r\n0;last\r\n\r\n",
    b'5;a=1;b="q v"\r\nhello\r\n0\r\n\r\n',
    b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nX-Other: two\r\n\r\n",
    b"3\r\na\rb\r\n0\r\n\r\n",  # a CR inside chunk data is just data
    b"3\r\n\r\n\n\r\n0\r\n\r\n",  # so is a CRLF
]


@pytest.mark.parametrize("body", VALID_BODIES)
def test_valid_body_all_at_once(body):
    checker = ChunkedBodyChecker()
    assert not checker.done
    assert checker.feed(body) is True
    assert checker.done


@pytest.mark.parametrize("body", VALID_BODIES)
def test_valid_body_byte_by_byte(body):
    checker = ChunkedBodyChecker()
    for index in range(len(body)):
        assert checker.feed(body[index : index + 1]) is True, index
        assert checker.done == (index == len(body) - 1), index


@pytest.mark.parametrize("body", VALID_BODIES)
def test_valid_body_in_every_two_piece_split(body):
    for cut in range(len(body) + 1):
        checker = ChunkedBodyChecker()
        assert checker.feed(body[:cut]) is True
        assert checker.feed(body[cut:]) is True
        assert checker.done, cut


def test_done_only_after_the_blank_line_that_ends_the_trailers():
    checker = ChunkedBodyChecker()
    assert checker.feed(b"5\r\nhello\r\n") and not checker.done
    assert checker.feed(b"0\r\n") and not checker.done
    assert checker.feed(b"X-T: 1\r\n") and not checker.done
    assert checker.feed(b"\r") and not checker.done
    assert checker.feed(b"\n") and checker.done


def test_empty_feed_is_fine():
    checker = ChunkedBodyChecker()
    assert checker.feed(b"") is True
    assert not checker.done


def test_bytes_after_the_end_belong_to_the_next_request_and_are_ignored():
    checker = ChunkedBodyChecker()
    assert checker.feed(b"0\r\n\r\nGARBAGE\r\r\n\x00 not chunked at all") is True
    assert checker.done
    # Once done, later feeds are ignored too.
    assert checker.feed(b"5;bad\rext\r\n") is True
    assert checker.done


@pytest.mark.parametrize(
    "body",
    [
        b"5;a=b\rc\r\nhello\r\n0\r\n\r\n",  # bare CR in a chunk extension
        b"5\r;x\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0;a\rb\r\n\r\n",  # ... in the last chunk's extension
        b"5\r\nhello\r\n0\r\nX-T: a\rb\r\n\r\n",  # bare CR in a trailer
        b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\r\n",  # bare CR in the blank line
        b"5\nhello\r\n0\r\n\r\n",  # bare LF ends the size line
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after the data
        b"5\r\nhelloX\r\n0\r\n\r\n",  # data longer than its size
        b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n",  # bare LF ends a trailer
        b"zz\r\nhello\r\n0\r\n\r\n",  # not hex
        b"\r\nhello\r\n0\r\n\r\n",  # no size at all
        b";ext\r\n",
    ],
)
def test_bad_framing_is_refused(body):
    assert ChunkedBodyChecker().feed(body) is False


@pytest.mark.parametrize(
    "body",
    [
        b"5;a=b\rc\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nX-T: a\rb\r\n\r\n",
    ],
)
def test_bare_cr_is_refused_when_fed_byte_by_byte(body):
    checker = ChunkedBodyChecker()
    results = [checker.feed(body[i : i + 1]) for i in range(len(body))]
    assert False in results


def test_bare_cr_split_just_before_the_lf_is_still_a_crlf():
    checker = ChunkedBodyChecker()
    assert checker.feed(b"5;a=b\r") is True
    assert checker.feed(b"\nhello\r\n0\r\n\r\n") is True
    assert checker.done


def test_an_endless_size_line_is_refused():
    checker = ChunkedBodyChecker()
    assert checker.feed(b"5;" + b"x" * 4000) is True
    assert checker.feed(b"x" * 200) is False


@pytest.mark.parametrize(
    ("size", "length"),
    [(b"0x5", 5), (b"0X5", 5), (b"+5", 5), (b"1_0", 16)],
)
def test_chunk_sizes_that_are_not_plain_hex_digits_are_refused(size, length):
    # RFC 9112: chunk-size = 1*HEXDIG. h11 refuses these; int(size, 16) does not,
    # and the checker must not follow a different framing than the parser beside it.
    body = size + b"\r\n" + b"x" * length + b"\r\n0\r\n\r\n"
    assert ChunkedBodyChecker().feed(body) is False


@pytest.mark.parametrize(
    "body",
    [
        b"-5\r\nhello\r\n0\r\n\r\n",
        # "-6" parses as int("-6", 16): the data state then moves the read position
        # back onto the "\r\n" and the "-6" line again, round and round.
        b"1\r\nx\r\n-6\r\nZ",
    ],
)
def test_a_negative_chunk_size_is_refused_and_does_not_loop_forever(body):
    code = f"from runnel.http.strict import ChunkedBodyChecker\nprint(ChunkedBodyChecker().feed({body!r}))\n"
    assert _run_isolated(code) == "False"


def _run_isolated(code: str) -> str:
    """Run code in a child interpreter so that a hang fails the test instead of the session."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("ChunkedBodyChecker.feed did not return (infinite loop)")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
