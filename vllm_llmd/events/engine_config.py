"""Engine-side KV-event defaults. Filled in by the KV-events issue; a no-op for now."""

from __future__ import annotations


def apply_event_defaults(role: str) -> str:
    """Apply KV-event defaults for this process; return a short description for the log."""
    return "unchanged"
