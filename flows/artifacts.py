"""Names of the Prefect artifacts Herald publishes (shared by every Prefect flow)."""

from __future__ import annotations


def artifact_key(name: str, what: str) -> str:
    """``herald-NAME-WHAT``: artifact keys allow lowercase letters, digits and dashes only,
    and only keyed artifacts appear on the Artifacts page with their history."""
    return f"herald-{name.lower().replace('_', '-')}-{what}"
