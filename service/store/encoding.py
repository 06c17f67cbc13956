"""JSON as the stores write it: compact, UTF-8, and text already serialised kept as it is."""

from __future__ import annotations

import json
from typing import Any


class RawJSON(str):
    """JSON text that was already serialised (and measured); stored as it is."""


def dumps(value: Any) -> str:
    if isinstance(value, RawJSON):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
