"""A ModelRunner built the way the engine builds one: its section of an EngineConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from radixserve.engine.config import EngineConfig, section
from radixserve.model_runner.config import RunnerConfig
from radixserve.model_runner.model_runner import ModelRunner


def make_runner(path: Path | str, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                **options: Any) -> ModelRunner:
    """EngineConfig's options (its defaults for the rest, progress bars off) on `device`."""
    options.setdefault("show_progress", False)
    config = EngineConfig(device=device, **options)
    return ModelRunner(path, device=torch.device(device), dtype=dtype, config=section(config, RunnerConfig))
