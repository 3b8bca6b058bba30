"""The order in which waiting requests are considered for admission."""

from __future__ import annotations

from radixserve.radix_tree import RadixTree
from radixserve.scheduler.request import Req

# LPM matches every waiting request against the tree each step; past this many
# waiting, that costs more than it saves and the order falls back to FCFS (as SGLang does).
LPM_MAX_WAITING = 128


def order_waiting(
    waiting: list[Req], policy: str, tree: RadixTree | None, step: int, aging_tokens_per_step: int
) -> list[Req]:
    """FCFS keeps arrival order (a retracted request goes back to the front).

    LPM (longest prefix match) serves first the requests whose prompt the tree
    holds most of, so requests sharing a prefix run while it is cached. Each
    step waited adds `aging_tokens_per_step` to a request's score, so a cache
    miss overtakes every newer request eventually and is never starved.
    """
    if policy == "fcfs" or tree is None or not 2 <= len(waiting) <= LPM_MAX_WAITING:
        return list(waiting)
    if policy != "lpm":
        raise ValueError(f"schedule_policy must be 'fcfs' or 'lpm', got {policy!r}")

    def score(req: Req) -> int:
        matched = tree.match_prefix(req.fill_ids[: req.match_limit], namespace=req.namespace).length
        return matched + aging_tokens_per_step * (step - req.arrival_step)

    scored = [(score(r), i, r) for i, r in enumerate(waiting)]
    # Highest score first; ties keep arrival order.
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [r for _, _, r in scored]
