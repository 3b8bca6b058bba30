"""The order in which waiting requests are considered for admission."""

from __future__ import annotations

from radixserve.radix_tree import RadixTree
from radixserve.scheduler.request import Req

SCHEDULE_POLICIES = ("fcfs", "lpm")  # admission order: arrival, or longest cached prefix first (aged)
# Order of a batch's requests: those sharing KV slots side by side (scheduler._prefix_order), or admission.
BATCH_ORDERS = ("prefix", "arrival")

# LPM matches every waiting request against the tree each step; past this many
# waiting, that costs more than it saves, and the order groups requests by their
# first PREFIX_KEY_TOKENS tokens instead (SGLang falls back to FCFS there).
LPM_MAX_WAITING = 128
PREFIX_KEY_TOKENS = 32


def order_waiting(
    waiting: list[Req], policy: str, tree: RadixTree | None, step: int, aging_tokens_per_step: int
) -> list[Req]:
    """FCFS keeps arrival order (a retracted request goes back to the front).

    LPM (longest prefix match) serves first the requests whose prompt the tree
    holds most of, so requests sharing a prefix run while it is cached. Each
    step waited adds `aging_tokens_per_step` to a request's score, so a cache
    miss overtakes every newer request eventually and is never starved.
    """
    if policy == "fcfs" or tree is None or len(waiting) < 2:
        return list(waiting)
    if policy != "lpm":
        raise ValueError(f"schedule_policy must be 'fcfs' or 'lpm', got {policy!r}")
    if len(waiting) > LPM_MAX_WAITING:
        return _group_by_prefix(waiting)

    def score(req: Req) -> int:
        matched = tree.match_prefix(req.fill_ids[: req.match_limit], namespace=req.namespace).length
        return matched + aging_tokens_per_step * (step - req.arrival_step)

    scored = [(score(r), i, r) for i, r in enumerate(waiting)]
    # Highest score first; ties keep arrival order.
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [r for _, _, r in scored]


def _group_by_prefix(waiting: list[Req]) -> list[Req]:
    """Requests whose prompts start alike side by side, groups in the order of their first
    arrival: a backlog of requests sharing system prompts then runs a few prompts at a time
    (their prefix cached and read once per step by cascade attention) instead of all of them
    interleaved. Costs one slice and hash per request, no tree walk."""
    first: dict[tuple, int] = {}
    keys = []
    for i, req in enumerate(waiting):
        key = (req.namespace, *req.fill_ids[:PREFIX_KEY_TOKENS])
        keys.append(first.setdefault(key, i))
    return [req for _, _, req in sorted(zip(keys, range(len(waiting)), waiting))]
