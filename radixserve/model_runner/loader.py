"""Loading a Hugging Face directory (config.json + safetensors) into our model.

Every checkpoint tensor is matched against the model's `checkpoint_layout()`
before any data is read, so a missing or unexpected weight fails fast with the
names; then tensors are copied shard by shard into their (possibly fused)
parameter rows, converted to the model dtype on the way. Per-expert tensors of
mixture-of-experts checkpoints land in their expert's slice of a stacked
[E, ...] parameter (WeightTarget.expert). With tensor parallelism each rank reads
only its part of a sharded tensor (WeightTarget.shard), through safetensors' slices:
the rest of the tensor is never read from the file.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from radixserve.model_runner.model_config import ModelConfig
from radixserve.model_runner.models import DecoderForCausalLM, WeightTarget, build_model
from radixserve.model_runner.parallel import TPComm

logger = logging.getLogger(__name__)

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_LISTED_NAMES = 8  # names shown in an error before "... and N more"


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    moe_backend: str = "auto",
    comm: TPComm | None = None,
) -> tuple[DecoderForCausalLM, ModelConfig]:
    """Build the model for the checkpoint in `path` and load its weights.

    dtype defaults to the checkpoint's (config.json `dtype`/`torch_dtype`);
    moe_backend picks the expert implementation of MoE models (models.MOE_BACKENDS);
    comm (tensor parallelism) makes the model this rank's share, read as slices.
    Raises ValueError for a missing config.json or weights, an unsupported
    architecture, and missing, unexpected or mis-shaped tensors.
    """
    config = ModelConfig.from_pretrained(path)
    files = weight_files(Path(path))
    start = time.perf_counter()
    model = build_model(config, device, dtype, moe_backend=moe_backend, comm=comm)
    load_weights(model, files, progress=progress)
    logger.info(
        "loaded %s (%s, %.1fM parameters, %s) from %s in %.1fs", config.architecture, model.embed_tokens.weight.dtype,
        sum(p.numel() for p in model.parameters()) / 1e6, device, path, time.perf_counter() - start,
    )
    return model, config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or model.safetensors."""
    index = path / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{str(index)!r} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"shards listed in {str(index)!r} are missing: {missing}")
        return files
    single = path / _SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(p.name for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".gguf"})
    raise ValueError(
        f"no weights in {str(path)!r}: expected {_SINGLE_FILE} or {_INDEX_FILE} "
        f"(found weight-like files: {found or 'none'}; only safetensors in the Hugging Face layout are loaded)"
    )


def load_weights(model: DecoderForCausalLM, files: list[Path], progress: bool = True) -> None:
    """Fill every parameter of `model` from the safetensors `files`."""
    names = _tensor_names(files)
    layout = model.checkpoint_layout({name for file_names in names.values() for name in file_names})
    _check_layout_tiles_parameters(model, layout)
    plan = _plan(model, layout, names)  # raises before any tensor data is read
    params = dict(model.named_parameters())
    with tqdm(total=sum(len(names) for names in plan.values()), desc="Loading weights", unit="tensor",
              disable=not progress) as bar:
        for file, file_names in plan.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in file_names:
                    target = layout[name]
                    _copy_into(params[target.param], target, _read(f, name, target))
                    bar.update(1)


def _tensor_names(files: list[Path]) -> dict[Path, list[str]]:
    """The tensor names of each file, from its header."""
    names = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names[file] = list(f.keys())
    return names


def _plan(
    model: DecoderForCausalLM, layout: dict[str, WeightTarget], names: dict[Path, list[str]]
) -> dict[Path, list[str]]:
    """Which layout names to read from which file, from the files' headers only.

    Errors name the missing, unexpected and mis-shaped tensors.
    """
    params = dict(model.named_parameters())
    plan: dict[Path, list[str]] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    misshaped: list[str] = []
    for file, file_names in names.items():
        plan[file] = []
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in file_names:
                if name not in layout:
                    if not model.ignores_checkpoint_tensor(name):
                        unexpected.append(name)
                    continue
                if name in seen:
                    raise ValueError(f"tensor {name!r} appears in more than one file of the checkpoint")
                seen.add(name)
                plan[file].append(name)
                target = layout[name]
                shape = tuple(f.get_slice(name).get_shape())
                dims = [target.rows, *_destination(params[target.param], target).shape[1:]]
                if target.shard is not None:  # the checkpoint holds the whole dimension
                    dims[target.shard.dim] = target.shard.full
                expected = tuple(dims)
                if shape != expected:
                    misshaped.append(f"{name!r} has shape {shape}, expected {expected}")
    missing = [name for name in layout if name not in seen]
    arch = model.config.architecture
    where = str(next(iter(names)).parent)
    if missing:
        raise ValueError(f"checkpoint {where!r} lacks {len(missing)} weight(s) {arch} needs: {_names(missing)}")
    if unexpected:
        raise ValueError(
            f"checkpoint {where!r} has {len(unexpected)} weight(s) {arch} does not use: {_names(unexpected)}"
        )
    if misshaped:
        raise ValueError(
            f"checkpoint {where!r} and its config.json disagree on {len(misshaped)} tensor shape(s): "
            f"{_names(misshaped)}"
        )
    return plan


def _destination(param: torch.Tensor, target: WeightTarget) -> torch.Tensor:
    """The tensor whose rows the target fills: the parameter, or one expert's slice of it."""
    return param if target.expert is None else param[target.expert]


def _read(f: Any, name: str, target: WeightTarget) -> torch.Tensor:
    """The tensor `name` of the open file `f`, or only this rank's shard of it (slices: the
    rest is not read)."""
    shard = target.shard
    if shard is None:
        return f.get_tensor(name)
    view = f.get_slice(name)
    lead = (slice(None),) * shard.dim
    pieces = [view[lead + (slice(start, start + shard.size),)] for start in shard.starts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=shard.dim)


def _copy_into(param: torch.Tensor, target: WeightTarget, tensor: torch.Tensor) -> None:
    with torch.no_grad():
        _destination(param, target).narrow(0, target.row_start, target.rows).copy_(tensor)


def _check_layout_tiles_parameters(model: DecoderForCausalLM, layout: dict[str, WeightTarget]) -> None:
    # A model bug, not a user error: some parameter would stay uninitialized.
    # Targets tile each parameter's rows, or (per-expert targets) each expert's rows, of every expert.
    rows: dict[str, dict[int | None, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for target in layout.values():
        rows[target.param][target.expert].append((target.row_start, target.rows))
    for name, param in model.named_parameters():
        groups = rows.get(name, {})
        if None in groups:
            filled = len(groups) == 1 and _tiles(groups[None], param.shape[0])
        else:
            experts = sorted(e for e in groups if e is not None)  # every key: None is not one here
            filled = experts == list(range(param.shape[0])) and all(
                _tiles(spans, param.shape[1]) for spans in groups.values()
            )
        if not filled:
            raise RuntimeError(f"checkpoint layout of {type(model).__name__} does not fill parameter {name}")


def _tiles(spans: list[tuple[int, int]], size: int) -> bool:
    covered = 0
    for start, count in sorted(spans):
        if start != covered:
            return False
        covered += count
    return covered == size


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED_NAMES])
    rest = len(names) - _LISTED_NAMES
    return shown + (f", ... and {rest} more" if rest > 0 else "")
