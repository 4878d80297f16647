"""The one rule for a function picking its HTTP status: a dict with an int "status_code"."""

import pytest

from runnel.errors import HTTPError
from runnel.surfaces.functions import split_status


def test_a_dict_with_an_int_status_code_picks_the_status():
    result = {"status_code": 201, "created": "book"}
    assert split_status(result, "create") == (201, {"created": "book"})
    assert result == {"status_code": 201, "created": "book"}  # the caller's dict is left alone


@pytest.mark.parametrize("result", [{"status_code": "201"}, {"status_code": True}, {"status_code": 2.0},
                                    {"created": 1}, [{"status_code": 201}], "text", None])
def test_anything_else_is_200_as_it_is(result):
    status, rest = split_status(result, "f")
    assert status == 200 and rest is result


@pytest.mark.parametrize("status", [42, 199, 600, -1])
def test_a_status_outside_200_599_is_a_500(status):
    with pytest.raises(HTTPError) as caught:
        split_status({"status_code": status}, "bad")
    error = caught.value
    assert (error.status, error.code) == (500, "invalid_status_code")
    assert f"Function 'bad' returned an invalid status_code {status}" == error.message
