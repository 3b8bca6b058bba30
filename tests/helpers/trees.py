"""Helpers for the radix tree tests (the `make_tree` fixture is in conftest.py)."""

from __future__ import annotations


def flat(values) -> list[int]:
    """A match's or an eviction's value pieces as one list of ints."""
    return [int(x) for piece in values for x in piece]
