"""Stored Responses API results, for `previous_response_id` and `GET /v1/responses/{id}`.

In memory and bounded: at most `max_items` responses and `max_chars` characters of
conversation text; past either bound the least recently used go first. Each entry
holds its own turn only (the input messages it added and its reply) and the id of the
response it continued, so a long conversation costs memory linear in its length; a
conversation whose earlier turn was evicted can no longer be continued.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # the response object as it was answered
    turn: tuple[dict[str, str], ...]  # the input messages it added, then its reply
    previous: str | None  # previous_response_id it continued
    chars: int


class ResponseStore:
    """id -> StoredResponse, LRU-bounded by count and by characters. Touched on the event loop only."""

    def __init__(self, max_items: int, max_chars: int) -> None:
        self.max_items = max_items
        self.max_chars = max_chars
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, body: dict[str, Any], turn: list[dict[str, str]], previous: str | None) -> None:
        chars = sum(len(m["content"]) for m in turn)
        if self.max_items < 1 or chars > self.max_chars:
            return
        self._items[body["id"]] = StoredResponse(body, tuple(turn), previous, chars)
        self._chars += chars
        while len(self._items) > self.max_items or self._chars > self.max_chars:
            _, old = self._items.popitem(last=False)
            self._chars -= old.chars

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._items.get(response_id)
        if entry is not None:
            self._items.move_to_end(response_id)
        return entry

    def conversation(self, response_id: str) -> list[dict[str, str]] | None:
        """Every message of the conversation up to and including `response_id`'s reply, oldest
        first; None when it or a turn before it is no longer stored."""
        turns = []
        current: str | None = response_id
        while current is not None:
            entry = self.get(current)
            if entry is None:
                return None
            turns.append(entry.turn)
            current = entry.previous
        return [m for turn in reversed(turns) for m in turn]
