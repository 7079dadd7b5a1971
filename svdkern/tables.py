"""The plain-text tables of svdkern's reports (`FlopsReport`, `PruneReport`, `TuneReport`,
`DecomposeReport`): the first four columns left-aligned, the rest right-aligned.

Example::

    print(format_table(("layer", "rank", "MACs"), [("fc", "8/64", "1,024")]))
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """`header` and `rows` as lines of columns two spaces apart, a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = [
        "  ".join(
            str(c).ljust(w) if i < 4 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    return "\n".join([fmt[0], line, *fmt[1:]])
