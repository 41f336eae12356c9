import pytest

from tokenreduce.ops import parse_r


def test_constant_and_list():
    assert parse_r(8, 4) == [8, 8, 8, 8]
    assert parse_r([8, 8, 8], 5) == [8, 8, 8, 0, 0]


def test_inflect_decreasing_as_upstream():
    assert parse_r([16, -1.0], 12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert parse_r((16, 1.0), 3) == [0, 16, 32]


@pytest.mark.parametrize("bad", [-1, [1, -1], [1] * 5, "8", [16, -3.0], True])
def test_bad(bad):
    with pytest.raises(ValueError):
        parse_r(bad, 4)
