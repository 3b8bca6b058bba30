"""Where a model comes from: a Hugging Face directory, or the built-in model; its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def resolve_model_path(model: str | None, progress: bool) -> Path:
    if model is None:
        from radixserve.model_runner.builtin_model import builtin_model_path

        return builtin_model_path(progress=progress)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model must be a local Hugging Face directory; {str(path)!r} is not a directory")
    return path


def load_tokenizer(path: Path) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).exists() for n in names):
        logger.info("no tokenizer in %s: token-id prompts only", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
