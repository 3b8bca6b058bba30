"""The attention backend interface: prefill-with-prefix and decode over slot lists.

Backends subclass `AttentionBackend` and override what they support; the defaults are
those of a backend with no kernel compiles, no CUDA graphs and no Triton decode.
"""

from __future__ import annotations

from typing import Any

import torch

from radixserve.model_runner.forward_batch import ForwardBatch


class AttentionBackend:
    """One backend serves every layer of one forward pass.

    `prepare` runs once per batch (build slot lists, masks, kernel metadata);
    `attend` runs once per layer after the layer's new K/V are in the pool.
    A backend with `supports_cascade` honours `ForwardBatch.cascade` (a shared
    prefix attended once per group, attention/cascade.py); the scheduler plans
    cascades only for such backends. One that `runs_in_graphs` takes metadata
    built on the device (`prepare_graph`) for captured decode steps, and its
    `attend` can be captured (model_runner/graphs/).
    """

    name: str
    supports_cascade: bool = False
    # Decode passes run our Triton split-KV kernels, which read the request table through
    # row indices (graph metadata is built for them: attention/metadata.py).
    triton_decode: bool = False
    # Kernel variants compiled after `finish_warm_up`: each stalls a step for seconds.
    compiles: int = 0

    def prepare(self, batch: ForwardBatch, req_to_token: torch.Tensor) -> None:
        raise NotImplementedError

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, *,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q `[T, Hq, D]` for the batch's new tokens; caches `[slots, Hkv, D]`; returns `[T, Hq, D]`.

        An fp8 pool's caches come with its layer's scales `[Hkv]` float32 (real value =
        stored * scale, kv_pool.py); None for a pool of real values."""
        raise NotImplementedError

    def runs_in_graphs(self, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether a model of this dtype and head size can run this backend under CUDA graphs."""
        return False

    def prepare_graph(self, meta: Any, cascade: Any = None) -> None:
        """Take metadata built on the device for a captured decode step (`runs_in_graphs` only)."""
        raise NotImplementedError(f"attention backend {self.name!r} does not run under CUDA graphs")

    def release(self) -> None:
        """Drop what the backend keeps between batches (the engine shut down; the runner
        released the pool)."""

    def finish_warm_up(self) -> None:
        """The runner has run every shape class serving meets (ModelRunner.warm_up): from here
        on, a backend that compiles kernels counts each compile in `compiles`."""
