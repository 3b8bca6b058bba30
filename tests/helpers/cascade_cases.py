"""Random attention batches whose sequences share prefix slots, with a cascade plan (tests)."""

from __future__ import annotations

import torch

from radixserve.model_runner.forward_batch import CascadePlan, ForwardBatch

GARBAGE = 300.0

# Groups of sequences: (shared prefix length, [(own tokens before this batch, new tokens), ...]).
CASES = {
    "decode_groups": [(40, [(3, 1), (9, 1), (0, 1), (17, 1)]), (0, [(25, 1)]), (70, [(5, 1), (2, 1)])],
    "extend_members": [(33, [(0, 5), (4, 1), (11, 7)]), (12, [(0, 1), (3, 2)])],
    "lone_with_prefix": [(50, [(6, 1)]), (0, [(0, 9)]), (20, [(1, 1), (0, 1), (2, 3)])],
    "long_prefix": [(1500, [(37, 1)] * 12), (0, [(800, 1)] * 3), (600, [(0, 64), (90, 1)])],
}


def make_cascade_case(groups, hq, hkv, d, seed, dtype=torch.float32, device="cpu"):
    """q, k_cache, v_cache, the request table and a batch with its cascade plan.

    Shared slots are one list per group (every member's row starts with it); every other
    slot is private; unused slots and table entries past each sequence hold garbage."""
    g = torch.Generator().manual_seed(seed)
    members = [(p, own, e) for p, seqs in groups for own, e in seqs]
    total = sum(p for p, _ in groups) + sum(own + e for _, own, e in members)
    num_slots = 2 * total + 64
    k = torch.randn(num_slots + 1, hkv, d, generator=g)
    v = torch.randn(num_slots + 1, hkv, d, generator=g)
    perm = torch.randperm(num_slots, generator=g) + 1
    used, unused = perm[:total].tolist(), perm[total:]
    k[unused], v[unused], k[0], v[0] = GARBAGE, GARBAGE, GARBAGE, GARBAGE
    max_context = max(p + own + e for p, own, e in members) + 11
    rows = torch.randperm(len(members) + 3, generator=g)[: len(members)].tolist()
    table = unused[torch.randint(0, len(unused), (len(members) + 3, max_context), generator=g)]
    out_slots, prefix_lens, extend_lens = [], [], []
    it = iter(rows)
    for p, seqs in groups:
        shared, used = used[:p], used[p:]
        for own, e in seqs:
            mine, used = used[: own + e], used[own + e :]
            row = next(it)
            table[row, : p + own + e] = torch.tensor(shared + mine, dtype=table.dtype)
            out_slots += mine[own:]
            prefix_lens.append(p + own)
            extend_lens.append(e)
    n = sum(extend_lens)
    batch = ForwardBatch(
        input_ids=torch.zeros(n, dtype=torch.int64),
        positions=torch.zeros(n, dtype=torch.int64),
        out_slots=torch.tensor(out_slots, dtype=torch.int64),
        req_rows=rows,
        prefix_lens=prefix_lens,
        extend_lens=extend_lens,
        logits_rows=torch.zeros(0, dtype=torch.int64),
        cascade=CascadePlan([len(seqs) for _, seqs in groups], [p for p, _ in groups]),
    ).to(torch.device(device))
    q = torch.randn(n, hq, d, generator=g)
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), table.to(device), batch)
