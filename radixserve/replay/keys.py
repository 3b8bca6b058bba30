"""Radix-tree keys for trace requests, and the token weight of each key element.

A hash-id trace is simulated at block granularity: one key element per block,
worth ``block_size`` tokens, so a 100k-token prompt is a key of ~200 elements.
This is exact, not an approximation, for traces whose blocks are content
hashes of a prefix (Mooncake, Bailian):

* Two prompts share their first N tokens exactly when they share their first
  N // block_size block ids (no finer sharing is recorded), so every branch of a
  token-level tree sits on a block boundary and the block tree has the same
  shape, node for node, with each node's size scaled by its elements' weights.
* LRU/LFU/FIFO/priority order nodes by access times, hit counts and creation,
  which the same sequence of operations sets identically in both trees; a
  token-level ``evict(n)`` and repeated block-level ``evict(ceil(rest / B))``
  free the same leaves (see CacheSim._evict).
* The last block of a prompt is usually partial. Its element is the pair
  (id, tokens) encoded as one negative int, so it only matches the same partial
  block; it weighs its own token count. A token-level cache would also share the
  first tokens of a partial block with a full block of the same id; that needs an
  id seen with two lengths, which a content hash rules out (neither shipped
  trace has one).

Outputs are not part of the next request's key (a trace records prompts only);
with ``insert_output`` each request adds one element of ``output_length - 1``
tokens that nothing matches again: the KV the engine keeps for generated tokens
(all but the last, which is sampled and never fed back).

Values given to the tree are ``range`` handles: ``(request index << 24) + position``,
so an evicted or matched piece tells which request created it and where.
"""

from __future__ import annotations

from radixserve.replay.formats import TraceRequest

POS_BITS = 24
POS_MASK = (1 << POS_BITS) - 1


def request_key(req: TraceRequest, insert_output: bool = False) -> tuple[int, ...]:
    """The key elements of ``req``: block ids or token ids, then maybe an output element."""
    if req.hash_ids is not None:
        key = req.hash_ids
        last = req.last_block_tokens
        if last != req.block_size:
            # Even negative ints: never equal to an id (ids are >= 0) or an output element.
            key = key[:-1] + (-2 * (key[-1] * (req.block_size + 1) + last) - 2,)
    else:
        assert req.input_ids is not None, "a TraceRequest sets one of hash_ids and input_ids"
        key = req.input_ids
    if insert_output and req.output_length > 1:
        key = key + (-2 * req.index - 1,)  # odd negative: unique to this request
    if len(key) > POS_MASK:
        raise ValueError(f"request {req.index} (line {req.line}) has {len(key)} key elements; at most {POS_MASK}")
    return key


def handles(req: TraceRequest, n: int) -> range:
    """Values for the first ``n`` key elements of ``req``."""
    base = req.index << POS_BITS
    return range(base, base + n)


class KeyWeights:
    """Token weights of a request's key: every element is ``block_size`` tokens
    except the last prompt element (a partial block) and the output element."""

    __slots__ = ("block_size", "n_prompt", "last", "out", "session", "refs", "key")

    def __init__(self, req: TraceRequest, key: tuple[int, ...], insert_output: bool) -> None:
        self.block_size = req.block_size
        prompt = req.hash_ids if req.hash_ids is not None else req.input_ids
        assert prompt is not None, "a TraceRequest sets one of hash_ids and input_ids"
        self.n_prompt = len(prompt)
        self.last = req.last_block_tokens
        self.out = req.output_length - 1 if insert_output and req.output_length > 1 else 0
        self.session = req.session
        self.refs = 0  # elements of this request cached in a tree (CacheSim bookkeeping)
        self.key = key

    def span(self, a: int, b: int) -> int:
        """Tokens in key positions [a, b)."""
        if b <= a:
            return 0
        w = (b - a) * self.block_size
        n = self.n_prompt
        if a < n <= b:
            w += self.last - self.block_size
        if self.out and a <= n < b:
            w += self.out - self.block_size
        return w
