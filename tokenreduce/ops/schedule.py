"""Per-layer reduction schedules, resolved once at patch time."""
from __future__ import annotations

from typing import List, Sequence, Union

ScheduleSpec = Union[int, Sequence[Union[int, float]]]


def is_inflect_pair(r: object) -> bool:
    """ToMe's ``(r, inflect)`` form: a 2-sequence whose second element is a float (``[16, -1.0]``)."""
    return (isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], float)
            and not isinstance(r[0], bool) and isinstance(r[0], (int, float)))


def parse_r(r: ScheduleSpec, num_layers: int) -> List[int]:
    """ToMe's per-layer schedule.

    Args:
        r: an int (the same r in every layer); ``(r, inflect)`` with a float inflect (``inflect < 0``
            decreasing, ``> 0`` increasing, 0 constant, same total); or a list of ints per layer, right-padded
            with zeros.
        num_layers: the model's depth.

    Returns:
        ``num_layers`` non-negative ints. Raises ValueError for a malformed or impossible schedule.
    """
    if isinstance(r, bool):
        raise ValueError(f"r must be an int, (r, inflect) or a list of ints, got {r!r}")
    if isinstance(r, int):
        r, inflect = r, 0.0
    elif is_inflect_pair(r):
        r, inflect = r[0], float(r[1])
    elif isinstance(r, (list, tuple)):
        values = list(r)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"a per-layer r list must hold ints, got {values!r}; for ToMe's (r, inflect) "
                             "schedule pass [r, inflect] with a float inflect, e.g. [16, -1.0]")
        if len(values) > num_layers:
            raise ValueError(f"r lists {len(values)} layers but the model has {num_layers} blocks")
        if any(v < 0 for v in values):
            raise ValueError(f"r must be >= 0 in every layer, got {values!r}")
        return values + [0] * (num_layers - len(values))
    else:
        raise ValueError(f"r must be an int, (r, inflect) or a list of ints, got {r!r}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if num_layers == 1:
        return [int(r)]
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1)
    values = [int(lo + step * i) for i in range(num_layers)]
    if any(v < 0 for v in values):
        raise ValueError(f"(r, inflect) = ({r}, {inflect}) gives negative r in some layers: {values}; "
                         "use |inflect| <= 1")
    return values
