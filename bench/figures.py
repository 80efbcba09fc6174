"""What every benchmark shares: writing its figures for ``--json PATH``, and its section of
bench/RESULTS.md for ``--write`` (``make bench``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def save_json(path: Path | None, figures: Any) -> None:
    """Write ``figures`` to ``path`` (creating its directory); nothing when ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")


RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, text: str, path: Path = RESULTS_MD) -> None:
    """Put ``text`` in ``path`` as the section ``name`` (between its two marker comments),
    replacing that section's last version and leaving the other benchmarks' sections as they are."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new, count = pattern.subn(lambda _: block, old)
    if not count:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    path.write_text(new)
