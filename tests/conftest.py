"""Shared fixtures. Every engine made through these fixtures is checked for leaks after each test:
all requests done, invariants hold, and after a cache flush every KV slot is back on the free list."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.leaks import LIVE_ENGINES, assert_no_leak

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu where there is one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield
    for engine in list(LIVE_ENGINES):
        assert_no_leak(engine)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from radixserve.model_runner.builtin_model import builtin_model_path

    return builtin_model_path(progress=False)


@pytest.fixture(scope="session")
def tiny_qwen3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.tiny_models import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture
def needs_fa4() -> None:
    """Skips a GPU test where the fa4 attention backend cannot run (the package is missing)."""
    from radixserve.model_runner.attention import available_backends

    if "fa4" not in available_backends("cuda"):
        pytest.skip("needs the fa4 attention backend")


@pytest.fixture(scope="session")
def qwen3_d64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 with a production-like head_dim 64 and GQA 8/2 (the GPU runner tests)."""
    from helpers.tiny_models import make_tiny_qwen3

    return make_tiny_qwen3(
        tmp_path_factory.mktemp("qwen3-d64"), hidden_size=128, head_dim=64,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
    )


@pytest.fixture
def device() -> str:
    """Where the Triton kernel tests run here: the GPU, or the CPU under Triton's interpreter
    (skipped where neither can: no triton, or no GPU and no TRITON_INTERPRET=1)."""
    import torch

    triton = pytest.importorskip("triton")
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU: run with TRITON_INTERPRET=1 to test the kernels on the CPU")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        # Checked here: 3.9.0 runs these; 3.6.0's interpreter loads a scalar as a
        # 1-element array, which a `range` bound in the kernel rejects.
        pytest.skip(f"the kernel tests need triton >= 3.9 under the interpreter (found {triton.__version__})")
    return "cpu"


def _engine(model: Path | str, **kw):
    from radixserve import Engine

    kw.setdefault("device", "cpu")
    kw.setdefault("check_invariants", True)
    kw.setdefault("show_progress", False)
    engine = Engine(str(model), **kw)
    LIVE_ENGINES.append(engine)
    return engine


def _close(engine) -> None:
    if engine in LIVE_ENGINES:
        assert_no_leak(engine)
        LIVE_ENGINES.remove(engine)
    engine.shutdown()


@pytest.fixture(scope="session")
def smollm_engine(smollm_path: Path) -> Iterator:
    """One shared SmolLM2 engine (the leak check flushes its cache after every test)."""
    engine = _engine(smollm_path, max_running_requests=16)
    yield engine
    _close(engine)


@pytest.fixture(scope="session")
def tiny_engine(tiny_qwen3_path: Path) -> Iterator:
    engine = _engine(tiny_qwen3_path, max_running_requests=16)
    yield engine
    _close(engine)


@pytest.fixture
def make_engine() -> Iterator[Callable]:
    """Build engines with custom options; each is leak-checked and shut down after the test."""
    made: list = []

    def make(model: Path | str, **kw):
        engine = _engine(model, **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        _close(engine)


@pytest.fixture
def make_tree() -> Iterator[Callable]:
    """Builds radix trees and verifies every invariant of each one after the test."""
    from radixserve.radix_tree import RadixTree

    trees: list[RadixTree] = []

    def make(**kwargs) -> RadixTree:
        tree = RadixTree(**kwargs)
        trees.append(tree)
        return tree

    yield make
    for tree in trees:
        tree.check()
