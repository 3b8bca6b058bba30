"""Greedy rollouts through bare ModelRunners, to compare an fp8 KV pool with a model-dtype one."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from helpers.tiny_models import runner_batch


def rollout(runner: Any, prompts: list[list[int]], steps: int,
            forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill every prompt (one batch, table rows 0..P-1), then `steps` decode steps of all of them.
    Each step feeds each sequence's greedy token, or `forced[:, step]` (teacher forcing). Returns
    the greedy tokens `[P, steps]` and the float32 logits they came from `[P, steps, V]` (CPU)."""
    runner.allocator.reset()
    rows = list(range(len(prompts)))
    out = runner.forward(runner_batch(runner, rows, [0] * len(rows), [torch.tensor(p) for p in prompts])).logits
    pos = [len(p) for p in prompts]
    tokens, logits = [], []
    for step in range(steps):
        out = out.float().cpu()
        logits.append(out)
        tokens.append(out.argmax(-1))
        feed = tokens[-1] if forced is None else forced[:, step]
        batch = runner_batch(runner, rows, pos, [feed[i : i + 1] for i in rows])
        out = runner.forward(batch).logits
        pos = [p + 1 for p in pos]
    return torch.stack(tokens, 1), torch.stack(logits, 1)


class Agreement(NamedTuple):
    first_divergence: list[int]  # per prompt: greedy tokens identical up to here (steps: all of them)
    forced_match: float  # teacher-forced on the reference's tokens: share of steps with the same argmax
    max_logit_error: float  # teacher-forced: largest |logit - reference logit|
    max_logit: float  # the reference's largest |logit| (the error's scale)


def agreement(ref: Any, other: Any, prompts: list[list[int]], steps: int) -> Agreement:
    """`other`'s greedy decoding against `ref`'s, free-running and teacher-forced on `ref`'s tokens."""
    want_tokens, want_logits = rollout(ref, prompts, steps)
    free_tokens, _ = rollout(other, prompts, steps)
    forced_tokens, forced_logits = rollout(other, prompts, steps, forced=want_tokens)
    first = []
    for a, b in zip(want_tokens.tolist(), free_tokens.tolist()):
        first.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), steps))
    return Agreement(
        first_divergence=first,
        forced_match=float((forced_tokens == want_tokens).float().mean()),
        max_logit_error=float((forced_logits - want_logits).abs().max()),
        max_logit=float(want_logits.abs().max()),
    )
