"""Cuts: a run of consecutive blocks [start, end) (end exclusive) replaced by one transform that is
folded into the anchor block start - 1. Their syntax, a model's candidates, and the checks."""
from __future__ import annotations

import re
from typing import Sequence

from replaceme_jax.errors import ReplaceMeError

Cut = tuple[int, int]


def parse_cut_syntax(text: str) -> list[Cut]:
    """'s-e[,s-e...]' (end exclusive) as pairs; the blocks are checked against the model later."""
    cuts = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if not m:
            raise ReplaceMeError(f"cannot parse cut {part!r} of cuts={text!r}: write each cut as start-end with "
                                 "end exclusive, comma-separated, e.g. 20-28 or 4-8,20-24")
        s, e = int(m.group(1)), int(m.group(2))
        if e <= s:
            raise ReplaceMeError(f"cut {part!r} is empty: the end (exclusive) must exceed the start")
        cuts.append((s, e))
    if not cuts:
        raise ReplaceMeError(f"cuts={text!r} holds no cut; give e.g. 20-28, or leave it empty to select cuts")
    return cuts


def validate_cuts(cuts: Sequence[Cut], num_blocks: int) -> tuple[Cut, ...]:
    """Cuts must keep an anchor block before them and stay inside the model."""
    out = []
    for cut in cuts:
        s, e = (int(x) for x in cut)
        if not (1 <= s < e <= num_blocks):
            raise ReplaceMeError(
                f"invalid cut [{s}, {e}) for a model of {num_blocks} blocks: need 1 <= start < end <= "
                f"{num_blocks} (block start-1 is the anchor that absorbs the transform)")
        out.append((s, e))
    return tuple(out)


def candidate_cuts(num_blocks: int, n: int) -> tuple[Cut, ...]:
    """Every cut of n consecutive blocks that keeps an anchor block before it."""
    if not 1 <= n < num_blocks:
        raise ReplaceMeError(f"cannot remove {n} blocks from a {num_blocks}-block model: "
                             f"choose 1 <= num_blocks <= {num_blocks - 1}")
    return tuple((s, s + n) for s in range(1, num_blocks - n + 1))


def parse_cuts(spec: str | list, num_blocks: int) -> list[Cut]:
    """User cut list, e.g. "20-28,5-7" or [(20, 28)] (end exclusive); checked for overlaps."""
    if isinstance(spec, str):
        cuts = parse_cut_syntax(spec)
    else:
        cuts = [tuple(c) for c in spec]
    cuts = sorted(validate_cuts(cuts, num_blocks))
    for (s1, e1), (s2, e2) in zip(cuts, cuts[1:]):
        if s2 < e1:
            raise ReplaceMeError(f"cuts [{s1}, {e1}) and [{s2}, {e2}) overlap; give disjoint cuts")
        if s2 == e1:
            raise ReplaceMeError(f"cut [{s2}, {e2}) starts where [{s1}, {e1}) ends, so its anchor block {s2 - 1} "
                                 f"would be removed; merge them into [{s1}, {e2}) or leave a block between")
    return cuts
