"""The leak check every engine made through the test fixtures goes through after each test."""

from __future__ import annotations

# Engines built by conftest's fixtures; a test whose engine dies on purpose removes it
# here, since a dead engine's pool cannot be checked.
LIVE_ENGINES: list = []


def assert_no_leak(engine) -> None:
    """Nothing running, invariants hold, and a flush returns every slot to the free list."""
    assert engine.wait_idle(120), "engine still busy after the test"
    engine.check_invariants()
    assert engine.flush_cache(), "flush refused: something is still locked"
    stats = engine.stats()
    assert stats["cache_tokens"] == 0
    assert stats["free_slots"] == stats["kv_capacity_tokens"], f"KV slots leaked: {stats}"
    engine.check_invariants()
