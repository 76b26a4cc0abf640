"""torch.distributed.checkpoint (DCP) I/O for the DDP engine, with nothing unpickled unguarded.

DCP's stock reader unpickles its `.metadata` file with plain `pickle.load`, and its load planner
reads non-tensor values with `torch.load(weights_only=False)`. A checkpoint directory can come
from anywhere (a shared filesystem, a colleague), so ours restricts the metadata unpickler to
DCP's own metadata classes and torch's dtype/size types, and reads non-tensor values with
`weights_only=True`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import pickle
import struct
import sys
import warnings
import zipfile
from collections import OrderedDict
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
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
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

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        """Read each whole, plain tensor straight into its destination (the model's parameter or
        the optimizer's state tensor); hand everything else to DCP's reader.

        DCP's reader `torch.load`s every item into a freshly allocated tensor and then copies it
        into the destination: twice the memory traffic, plus first-touch page faults on the fresh
        memory, which made our resume 2-3x slower than accelerate's load. An item is read
        directly only when its record is exactly the destination's bytes: one contiguous,
        little-endian storage of the destination's dtype and shape, not narrowed (no resharding),
        with no storage transforms. Anything else takes DCP's path unchanged."""
        rest = []
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if item.type == LoadItemType.TENSOR and not info.transform_descriptors:
                per_file.setdefault(info.relative_path, []).append(item)
            else:
                rest.append(item)
        for relative_path, items in per_file.items():
            path = self.fs.concat_path(self.path, relative_path)
            with open(path, "rb", buffering=0) as f:
                for item in items:
                    dest = planner.resolve_tensor(item).detach()
                    if _read_direct(f, self.storage_data[item.storage_index], item, dest):
                        planner.commit_tensor(item, dest)
                    else:
                        rest.append(item)
        if rest:
            return super().read_data(dataclasses.replace(plan, items=rest), planner)
        done: torch.futures.Future[None] = torch.futures.Future()  # DCP calls .wait() on it
        done.set_result(None)
        return done


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # Non-tensor values (optimizer hyperparameters) are plain numbers, tuples and lists.
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _NotPlain(Exception):
    """A record that is not one whole plain tensor: DCP's own reader handles it."""


class _SliceView(io.RawIOBase):
    """A read-only window [offset, offset + length) of an open file, for zipfile."""

    def __init__(self, f: Any, offset: int, length: int) -> None:
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(base + pos, 0), self.length)
        return self.pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")[: max(self.length - self.pos, 0)]
        self.f.seek(self.offset + self.pos)
        n = self.f.readinto(view) or 0
        self.pos += n
        return n


class _TensorRecordUnpickler(pickle.Unpickler):
    """Reads torch.save's pickle of one tensor as (storage, offset, size, stride), allowing
    nothing else: any other object in the record means it is not a plain tensor."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, size, stride)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _storage_dtypes():
            return _storage_dtypes()[name]
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _NotPlain("storage")
        _, dtype, key, _location, numel = pid
        return (dtype, str(key), int(numel))


@functools.cache
def _storage_dtypes() -> dict[str, torch.dtype]:
    """torch's legacy storage class names (`FloatStorage`, ...) as torch.save pickles them."""
    table = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy classes warn that TypedStorage is deprecated
        for name in dir(torch):
            dtype = (
                getattr(getattr(torch, name), "dtype", None) if name.endswith("Storage") else None
            )
            if isinstance(dtype, torch.dtype):
                table[name] = dtype
    return table


_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip local file header, 30 bytes


def _read_direct(f: Any, info: Any, item: ReadItem, dest: torch.Tensor) -> bool:
    """Read one DCP tensor record into `dest` if it is exactly dest's bytes (see read_data)."""
    if (
        dest.device.type != "cpu"
        or not dest.is_contiguous()
        or any(item.storage_offsets)
        or tuple(item.lengths) != tuple(dest.shape)
        or sys.byteorder != "little"
    ):
        return False
    try:
        archive = zipfile.ZipFile(_SliceView(f, info.offset, info.length))
        names = archive.namelist()
        prefix = names[0].split("/", 1)[0] + "/"
        if archive.read(prefix + "byteorder") != b"little":
            raise _NotPlain("byteorder")
        storage, offset, size, stride = _TensorRecordUnpickler(
            io.BytesIO(archive.read(prefix + "data.pkl"))
        ).load()
        dtype, key, numel = storage
        record = archive.getinfo(f"{prefix}data/{key}")
        if (
            dtype != dest.dtype
            or offset != 0
            or tuple(size) != tuple(dest.shape)
            or numel != dest.numel()
            or tuple(stride) != tuple(dest.stride())
            or record.compress_type != zipfile.ZIP_STORED
            or record.file_size != dest.numel() * dest.element_size()
        ):
            raise _NotPlain("layout")
        f.seek(info.offset + record.header_offset)
        sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if sig != b"PK\x03\x04":
            raise _NotPlain("header")
    except (_NotPlain, zipfile.BadZipFile, KeyError, ValueError, TypeError, pickle.PickleError):
        return False
    start = info.offset + record.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    f.seek(start)
    view = memoryview(dest.view(-1).view(torch.uint8).numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"{getattr(f, 'name', 'checkpoint file')}: truncated tensor record")
        got += n
    return True


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


def _options(trainable_only: bool, loading: bool = False) -> StateDictOptions:
    # Frozen base weights (LoRA/QLoRA) are not saved: they come from model.name_or_path. On
    # load they are absent on purpose; a missing trainable tensor still fails (DCP's planner
    # finds it missing from the checkpoint).
    return StateDictOptions(
        ignore_frozen_params=trainable_only, strict=not (trainable_only and loading)
    )


def model_optim_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool
) -> dict[str, Any]:
    if not trainable_only:
        msd, osd = get_state_dict(model, optimizer, options=_options(trainable_only))
        return {"model": msd, "optim": osd}
    # The trainable parameters only, taken from the module itself: torch's get_state_dict
    # looks every state-dict entry up as an attribute, and a quantized base has entries that
    # are none (Linear8bitLt's `SCB`: it raises) or not parameters (4-bit absmax, quant_map),
    # all of them frozen base state that comes from model.name_or_path again on resume.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    msd = {k: v for k, v in model.state_dict().items() if k in trainable}
    osd = get_optimizer_state_dict(model, optimizer, options=_options(trainable_only))
    return {"model": msd, "optim": osd}


def save(state: dict[str, Any], directory: Path, process_group: Any = None) -> None:
    """Every rank writes its own part (replicated tensors are written once, not by rank 0 alone)."""
    dcp.save(
        state,
        storage_writer=_ClearErrorsWriter(str(directory)),
        process_group=process_group,
        no_dist=not dist.is_initialized(),
    )


class ReusedStagingBuffers:
    """DCP `AsyncStager` that copies the state into CPU buffers kept from the previous save.

    Staging is the part of an async save the training thread waits for. DCP's default stager
    allocates a fresh CPU copy of the whole state every save, and first-touching that memory
    (page faults, zeroing) costs more than the copy itself; keeping the buffers makes every save
    after the first a plain copy (a device-to-host copy into pinned memory on a GPU). The price
    is host memory: one copy of this rank's checkpoint state stays allocated between saves. It
    is safe to overwrite the buffers because a new save waits until the previous one is written
    (CheckpointManager.save)."""

    # stage() returns only once the copy is done: nothing for DCP to wait on afterwards.
    _synchronize_after_execute = False

    def __init__(self) -> None:
        self._buffers: Any = None
        self._layout: Any = None

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        layout = _layout(state_dict)
        if layout != self._layout:  # first save, or the state changed shape (new optimizer state)
            self._buffers = _cpu_buffers(state_dict, pin=torch.cuda.is_available())
            self._layout = layout
        staged = _copy_into(state_dict, self._buffers)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # host-device sync: the non-blocking copies must be done
        return staged

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._buffers = self._layout = None


def _layout(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return tuple((k, _layout(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, *(_layout(v) for v in obj))
    return None  # plain values are copied every time, whatever they are


def _cpu_buffers(obj: Any, pin: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu")
        return buf.pin_memory() if pin and buf.numel() else buf
    if isinstance(obj, dict):
        return {k: _cpu_buffers(v, pin) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_buffers(v, pin) for v in obj)
    return None


def _copy_into(obj: Any, buf: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return buf.copy_(obj.detach(), non_blocking=obj.device.type == "cuda")
    if isinstance(obj, dict):
        return {k: _copy_into(v, buf[k]) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_into(v, b) for v, b in zip(obj, buf, strict=True))
    return copy.deepcopy(obj)  # lr, betas, step counts: the values as of now


def async_save(
    state: dict[str, Any],
    directory: Path,
    process_group: Any,
    stager: ReusedStagingBuffers | None = None,
) -> Future:
    """Stage to CPU now, write in the background; the Future resolves when this rank is done."""
    return dcp.async_save(
        state,
        storage_writer=_ClearErrorsWriter(str(directory)),
        process_group=process_group,
        async_stager=stager,
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
    if not trainable_only:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=_options(trainable_only),
        )
        return
    # See model_optim_state: the frozen base is not in the checkpoint and stays as loaded.
    missing = set(state["model"]) - set(model.state_dict())
    assert not missing, f"trainable tensors with no place in the model: {sorted(missing)[:3]}"
    model.load_state_dict(state["model"], strict=False)
    set_optimizer_state_dict(
        model, optimizer, state["optim"], options=_options(trainable_only, loading=True)
    )


def read_tensor_names(directory: Path) -> dict[str, tuple[int, ...]]:
    """`model.*` tensor names and shapes recorded in a DCP checkpoint's metadata."""
    metadata = SafeFileSystemReader(str(directory)).read_metadata()
    shapes = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if fqn.startswith("model.") and hasattr(meta, "size"):
            shapes[fqn[len("model.") :]] = tuple(meta.size)
    return shapes
