"""Tables of the gateway authority (kept apart so features can grow without one huge module)."""

from __future__ import annotations

__all__: list[str] = []
