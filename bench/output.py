"""How every bench script ends: its result as JSON on stdout, and in `--out` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report(result: Any, out: Path | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        out.write_text(text + "\n")
