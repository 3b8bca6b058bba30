"""The contract between the scheduler and the model runner: what one step hands the
runner (`ForwardBatch`, with its `CascadePlan`; a `SamplingRow` per sampled request) and
what comes back (`ForwardOutput`, `SampleOutput`). The scheduler imports this module and
the KV pool's bookkeeping, never a model, a backend or a graph runner.

A decode is an extend of one token, so one batch mixes prefill chunks and
decodes. For sequence i the batch computes tokens
`[prefix_lens[i], seq_lens[i])` of request row `req_rows[i]`; its K/V history
is `req_to_token[req_rows[i], :seq_lens[i]]` once this batch's K/V are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from radixserve.model_runner.transfer import to_device
from radixserve.sampling_params import SamplingParams


class CascadePlan(NamedTuple):
    """Sequences of a batch that share a prefix's K/V slots, for cascade attention.

    The batch's sequences form consecutive groups (`group_sizes`, summing to the
    batch size); every member of group g holds the same first `prefix_lens[g]`
    slots, all computed before this batch's tokens (0 for a sequence alone).
    Attention then reads each shared prefix once per group, not once per member
    (attention/cascade.py).
    """

    group_sizes: list[int]
    prefix_lens: list[int]

    @property
    def shared_lens(self) -> list[int]:
        """Per sequence: the shared prefix length of its group."""
        return [p for p, n in zip(self.prefix_lens, self.group_sizes) for _ in range(n)]

    @classmethod
    def from_runs(cls, runs: Sequence[int], min_prefix: int) -> CascadePlan:
        """Groups of consecutive sequences from `runs[i]`, the slots sequences i and i + 1 share:
        neighbours sharing at least `min_prefix` join a group, whose prefix is the shortest run
        inside it."""
        sizes, prefixes = [1], [0]
        for shared in runs:
            if shared >= min_prefix:
                prefixes[-1] = shared if sizes[-1] == 1 else min(prefixes[-1], shared)
                sizes[-1] += 1
            else:
                sizes.append(1)
                prefixes.append(0)
        return cls(sizes, prefixes)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64, the new tokens of every sequence, in batch order
    positions: torch.Tensor  # [T] int64
    out_slots: torch.Tensor  # [T] int64, the KV slot each new token's K/V is written to
    req_rows: list[int]  # [B] row of each sequence in the req_to_token table
    prefix_lens: list[int]  # [B] tokens already in the KV pool before this batch
    extend_lens: list[int]  # [B] new tokens of each sequence
    logits_rows: torch.Tensor  # [N] rows of the hidden states to compute logits for
    unfold: torch.Tensor | None = None  # mlp fold: [T_attn] attention token -> compact row
    fold: torch.Tensor | None = None  # mlp fold: [rows] compact row -> attention token
    hidden_rows: torch.Tensor | None = None  # rows whose final hidden state is returned (pooling)
    score_rows: torch.Tensor | None = None  # rows whose logprob of score_targets is returned
    score_targets: torch.Tensor | None = None
    # With score rows: None returns each target's logprob alone; k >= 0 also its rank, and k > 0
    # the k most likely tokens of each row (prompt logprobs; k is the most any request asked for).
    score_top: int | None = None
    # Overlapped scheduling: some new tokens are still on the device, sampled by the previous
    # step (`input_source`); at the positions `sourced` of input_ids stands each one's row
    # in that tensor, not a token id (resolve_inputs). None: every id is a token id.
    sourced: torch.Tensor | None = None
    input_source: torch.Tensor | None = None
    cascade: CascadePlan | None = None  # groups sharing a prefix (None: attend per sequence)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self.req_rows)

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]

    @property
    def is_decode(self) -> bool:
        """Every sequence extends by exactly one token."""
        return all(e == 1 for e in self.extend_lens)

    def to(self, device: torch.device) -> ForwardBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else to_device(t, device)

        return ForwardBatch(
            input_ids=to_device(self.input_ids, device),
            positions=to_device(self.positions, device),
            out_slots=to_device(self.out_slots, device),
            req_rows=self.req_rows,
            prefix_lens=self.prefix_lens,
            extend_lens=self.extend_lens,
            logits_rows=to_device(self.logits_rows, device),
            unfold=move(self.unfold),
            fold=move(self.fold),
            hidden_rows=move(self.hidden_rows),
            score_rows=move(self.score_rows),
            score_targets=move(self.score_targets),
            score_top=self.score_top,
            sourced=move(self.sourced),
            input_source=self.input_source,
            cascade=self.cascade,
        )


def resolve_inputs(ids: torch.Tensor, sourced: torch.Tensor, source: torch.Tensor) -> None:
    """In place: the ids at positions `sourced` are rows of `source`; put its tokens there.

    A step of decodes all sourced (`sourced` is every position, in order) takes one gather."""
    if sourced.numel() == ids.numel():
        ids.copy_(source.index_select(0, ids))
    elif sourced.numel():
        sourced = to_device(sourced, ids.device)
        ids[sourced] = source.index_select(0, ids[sourced])


class ScoreOutput(NamedTuple):
    """Per score row, from the fp32 log_softmax over the vocabulary (raw: no sampling parameter
    applies): the target's logprob, and where `ForwardBatch.score_top` asks, its rank and the top k."""

    logprobs: torch.Tensor  # [N] float32
    ranks: torch.Tensor | None  # [N] int64: how many tokens are at least as likely as the target (1: the argmax)
    top_ids: torch.Tensor | None  # [N, k] int64, most likely first
    top_logprobs: torch.Tensor | None  # [N, k] float32, descending


class ForwardOutput(NamedTuple):
    logits: torch.Tensor  # [len(logits_rows), vocab] float32
    hidden: torch.Tensor | None  # [len(hidden_rows), H] float32
    scores: ScoreOutput | None  # one entry per score row


class SamplingRow(NamedTuple):
    """What the sampler needs to know about one row for one step."""

    params: SamplingParams
    # Read only for rows that use the penalty. Int64 arrays (`array`, numpy) are copied in
    # one go and CPU tensors taken as they are; a list is converted id by id.
    token_history: Sequence[int]  # prompt + output ids so far (repetition penalty)
    output_ids: Sequence[int]  # output ids so far (presence/frequency penalties)
    seed: int  # always set: the scheduler draws one for unseeded requests
    step: int  # tokens generated so far
    suppress_ids: Sequence[int] = ()  # ids forbidden this step (EOS/stop ids below min_tokens, bad words)


class SampleOutput(NamedTuple):
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, raw logprob of each sampled token; None if no row asked
    top_ids: torch.Tensor | None  # [B, k] int64, most likely first; k = the most any row asked for
    top_logprobs: torch.Tensor | None  # [B, k] float32, raw, descending; rows that asked fewer slice
