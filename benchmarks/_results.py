"""Where every benchmark script writes its JSON result (imported by the scripts, which run
with this folder first on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(result: dict, name: str, quick: bool = False, out: Path | None = None) -> Path:
    """Write `result` to `out`, or results/NAME.json (NAME_quick.json for --quick); print the path."""
    path = out or RESULTS / (f"{name}_quick.json" if quick else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"-> {path}")
    return path
