"""torch.distributed.checkpoint (DCP) I/O for the DDP engine, with nothing unpickled unguarded.

DCP's stock reader unpickles its `.metadata` file with plain `pickle.load`, and its load planner
reads non-tensor values with `torch.load(weights_only=False)`. A checkpoint directory can come
from anywhere (a shared filesystem, a colleague), so ours restricts the metadata unpickler to
DCP's own metadata classes and torch's dtype/size types, and reads non-tensor values with
`weights_only=True`.
"""

from __future__ import annotations

import io
import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

# Single-process saves and loads are intended (world size 1, export); DCP warns on each one.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # any class of DCP's metadata module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint's metadata referenced something other than plain checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        if module in _ALLOWED and (allowed is None or name in allowed):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if (
                isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
                or value is torch.Size
            ):
                return value
        raise UnsafeCheckpointError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except UnsafeCheckpointError as e:
                raise UnsafeCheckpointError(f"{path}: {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # Non-tensor values (optimizer hyperparameters) are plain numbers, tuples and lists.
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _root_cause(e: BaseException) -> BaseException:
    """The OSError behind a write failure (disk full, file too large, permissions), if any:
    torch.save's zip writer reports it only as `unexpected pos ...`, with the OSError as its
    __context__, and DCP's cross-rank gather (a pickle) drops __context__."""
    seen = 0
    cause: BaseException | None = e
    while cause is not None and seen < 16:
        if isinstance(cause, OSError):
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return e


class _ClearErrorsWriter(FileSystemWriter):
    def write_data(self, plan: Any, planner: Any) -> Future:
        try:
            return super().write_data(plan, planner)
        except Exception as e:
            cause = _root_cause(e)
            if cause is e:
                raise
            raise OSError(cause.errno, cause.strerror, getattr(cause, "filename", None)) from e


def _options(trainable_only: bool) -> StateDictOptions:
    # Frozen base weights (LoRA/QLoRA) are not saved: they come from model.name_or_path.
    return StateDictOptions(ignore_frozen_params=trainable_only)


def model_optim_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool
) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optimizer, options=_options(trainable_only))
    return {"model": msd, "optim": osd}


def save(state: dict[str, Any], directory: Path, process_group: Any = None) -> None:
    """Every rank writes its own part (replicated tensors are written once, not by rank 0 alone)."""
    dcp.save(
        state,
        storage_writer=_ClearErrorsWriter(str(directory)),
        process_group=process_group,
        no_dist=not dist.is_initialized(),
    )


def async_save(state: dict[str, Any], directory: Path, process_group: Any) -> Future:
    """Stage to CPU now, write in the background; the Future resolves when this rank is done."""
    return dcp.async_save(
        state, storage_writer=_ClearErrorsWriter(str(directory)), process_group=process_group
    )


def load_into(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    directory: Path,
    trainable_only: bool,
) -> None:
    """Load model (and optimizer) state saved by `save`, resharding to this world size."""
    no_dist = not dist.is_initialized()
    SafeFileSystemReader(str(directory)).read_metadata()  # refuses a tampered pickle, plainly
    if optimizer is None:
        msd = model.state_dict()
        if trainable_only:
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            msd = {k: v for k, v in msd.items() if k in names}
        state = {"model": msd}
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(directory)),
            planner=SafeLoadPlanner(allow_partial_load=True),
            no_dist=no_dist,
        )
        model.load_state_dict(state["model"], strict=not trainable_only)
        return
    state = model_optim_state(model, optimizer, trainable_only)
    dcp.load(
        state,
        storage_reader=SafeFileSystemReader(str(directory)),
        planner=SafeLoadPlanner(),
        no_dist=no_dist,
    )
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_options(trainable_only),
    )


def read_tensor_names(directory: Path) -> dict[str, tuple[int, ...]]:
    """`model.*` tensor names and shapes recorded in a DCP checkpoint's metadata."""
    metadata = SafeFileSystemReader(str(directory)).read_metadata()
    shapes = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if fqn.startswith("model.") and hasattr(meta, "size"):
            shapes[fqn[len("model.") :]] = tuple(meta.size)
    return shapes
