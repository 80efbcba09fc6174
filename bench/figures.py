"""What every benchmark shares: writing its figures for ``--json PATH``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_json(path: Path | None, figures: Any) -> None:
    """Write ``figures`` to ``path`` (creating its directory); nothing when ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
