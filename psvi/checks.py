"""Input checks both backends share (pure Python)."""

from __future__ import annotations


def check_latents_match(expected: dict, found: dict, what: str, fix: str) -> None:
    """Raise a ``ValueError`` naming the sites whose presence or shape differs."""
    if expected == found:
        return
    diffs = [
        f"{name!r}: {expected.get(name, 'absent')} vs {found.get(name, 'absent')}"
        for name in sorted(set(expected) | set(found))
        if expected.get(name) != found.get(name)
    ]
    raise ValueError(f"{what} ({'; '.join(diffs)}). {fix}")
