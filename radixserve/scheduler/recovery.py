"""Which requests made a step fail: probes that halve the suspects until one fails alone.

A step that raises while scheduling, running the model or sampling leaves the
requests that took part in it in an unknown state (their newest K/V may never
have been written). The scheduler resets every request holding KV state to
waiting, with its output so far (`Scheduler.recover`), and they become
suspects. Suspects run again in probe groups; while any remain, only the
current probe is admitted:

    a step fails with S running, S > 1    ->  suspects += S; probe = first half of S
    a step fails with one request running ->  that request is the cause: it ends with
                                              finish_reason "error"
    every probe member has sampled a token, or finished
                                          ->  the members are cleared (and retracted, so
                                              the next probe runs alone); next probe =
                                              first half of the suspects left

So a request is failed only when a step in which it ran alone failed, and the
cause of a deterministic failure among n requests is found in about log2(n)
failed steps. The others finish as they would have: a reset request
recomputes its prompt and output so far, as after a retraction.
"""

from __future__ import annotations

from radixserve.scheduler.request import Req


class Quarantine:
    def __init__(self) -> None:
        self.suspects: list[Req] = []
        # id(req) -> len(req.output_ids) when its probe began; a member passes once it grows.
        self._probe: dict[int, int] = {}

    @property
    def active(self) -> bool:
        return bool(self.suspects)

    def admits(self, req: Req) -> bool:
        """Whether `req` may be admitted now: anyone outside quarantine, else probe members."""
        return not self.suspects or id(req) in self._probe

    def in_probe(self, req: Req) -> bool:
        return id(req) in self._probe

    def on_failure(self, ran: list[Req]) -> Req | None:
        """A step failed with `ran` holding KV state (now reset). Returns the request found to
        be the cause (it ran alone), or None after narrowing the probe."""
        ran = [r for r in ran if not r.finished]
        if len(ran) == 1:
            cause = ran[0]
            self.suspects = [r for r in self.suspects if r is not cause]
            self._probe.pop(id(cause), None)
            if not self._probe:
                self._next_probe()
            return cause
        known = {id(r) for r in self.suspects}
        self.suspects = [r for r in ran if id(r) not in known] + self.suspects
        if ran:
            self._start_probe(ran[: (len(ran) + 1) // 2])
        return None

    def passed(self) -> list[Req]:
        """If every probe member has sampled a token since its probe began (or finished), clear
        them and start the next probe; return the cleared members that still run."""
        if not self._probe:
            return []
        members = [r for r in self.suspects if id(r) in self._probe]
        if any(not r.finished and (r.task != "generate" or len(r.output_ids) <= self._probe[id(r)]) for r in members):
            return []
        self.suspects = [r for r in self.suspects if id(r) not in self._probe]
        self._next_probe()
        return [r for r in members if not r.finished]

    def _next_probe(self) -> None:
        self.suspects = [r for r in self.suspects if not r.finished]
        self._start_probe(self.suspects[: (len(self.suspects) + 1) // 2])

    def _start_probe(self, members: list[Req]) -> None:
        self._probe = {id(r): len(r.output_ids) for r in members}
