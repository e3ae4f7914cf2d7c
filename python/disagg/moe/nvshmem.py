"""NVSHMEM transport for ``EPDispatcher``: token rows go straight into the owning ranks'
symmetric GPU buffers with put-with-signal (``csrc/cuda/nvshmem/ep_transport.cu``).

The kernels live in ``libdisagg_nvshmem.so``, built next to the extension when disagg is built
with ``DISAGG_CUDA=ON DISAGG_NVSHMEM=ON`` (headers and libraries from the
``nvidia-nvshmem-cu13`` wheel). NVSHMEM is bootstrapped from a ``torch.distributed`` group: rank
0 makes a unique id and broadcasts it over the group, every rank joins with its group rank.
One NVSHMEM job per process: every transport of a process must use the same group.
"""
from __future__ import annotations

import atexit
import ctypes
import math
import os
from itertools import accumulate
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

LIB_NAME = "libdisagg_nvshmem.so"
FP8_GROUP = 128  # columns per FP8 scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn

_lib: Optional[ctypes.CDLL] = None
_job: Optional[dict] = None  # the process's NVSHMEM job: rank, world size, device


def library_path() -> Path:
    return Path(__file__).resolve().parents[1] / LIB_NAME


def nvshmem_built() -> bool:
    """True when disagg was built with the NVSHMEM transport library."""
    return library_path().exists()


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if not path.exists():
        raise RuntimeError(
            "disagg was built without the NVSHMEM transport (no libdisagg_nvshmem.so): rebuild "
            "with `DISAGG_CUDA=ON DISAGG_NVSHMEM=ON pip install --no-build-isolation .` after "
            "`pip install nvidia-nvshmem-cu13`, or use transport='torch'")
    try:  # the wheel's host library and bootstrap plugin, found without LD_LIBRARY_PATH
        import nvidia.nvshmem as nv

        libdir = Path(list(nv.__path__)[0]) / "lib"
        ctypes.CDLL(str(libdir / "libnvshmem_host.so.3"), mode=ctypes.RTLD_GLOBAL)
        os.environ.setdefault("NVSHMEM_BOOTSTRAP_UID_PLUGIN", str(libdir / "nvshmem_bootstrap_uid.so.3"))
    except (ImportError, OSError, IndexError):
        pass  # rely on the library's rpath / the loader's search path
    lib = ctypes.CDLL(str(path))
    c_i64, c_vp = ctypes.c_int64, ctypes.c_void_p
    for name, res, args in [
        ("uid_bytes", ctypes.c_int, []),
        ("get_uid", ctypes.c_int, [c_vp]),
        ("init", ctypes.c_int, [c_vp, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
        ("my_pe", ctypes.c_int, []),
        ("n_pes", ctypes.c_int, []),
        ("create", c_vp, [c_i64]),
        ("destroy", None, [c_vp]),
        ("finalize", None, []),
        ("error_string", ctypes.c_char_p, [ctypes.c_int]),
        ("all_to_all", ctypes.c_int, [c_vp, c_vp, c_vp, c_vp, c_vp, c_i64, ctypes.c_uint64, c_vp]),
    ]:
        fn = getattr(lib, f"disagg_nvshmem_{name}")
        fn.restype, fn.argtypes = res, args
    _lib = lib
    return lib


def _finalize():
    global _job
    if _job is not None and _lib is not None:
        _lib.disagg_nvshmem_finalize()
        _job = None


def _bootstrap(group: Optional[dist.ProcessGroup], device: torch.device) -> dict:
    """Joins (or checks) the process's NVSHMEM job: rank 0's unique id over ``group``."""
    global _job
    lib = _load()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if _job is not None:
        if (_job["rank"], _job["world"], _job["device"]) != (rank, world, device.index):
            raise RuntimeError(
                f"NVSHMEM is already initialized in this process as PE {_job['rank']} of "
                f"{_job['world']} on cuda:{_job['device']}; every NvshmemTransport of a process "
                "must use the same group and device")
        return _job
    nbytes = lib.disagg_nvshmem_uid_bytes()
    uid = (ctypes.c_ubyte * nbytes)()
    if rank == 0:
        rc = lib.disagg_nvshmem_get_uid(uid)
        if rc != 0:
            raise RuntimeError(f"nvshmemx_get_uniqueid failed ({rc})")
    # the group's backend decides where the broadcast tensor lives (NCCL: on the GPU)
    bdev = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    buf = torch.tensor(bytearray(uid), dtype=torch.uint8, device=bdev)
    dist.broadcast(buf, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    ctypes.memmove(uid, bytes(buf.cpu().tolist()), nbytes)
    rc = lib.disagg_nvshmem_init(uid, rank, world, device.index)
    if rc != 0:
        raise RuntimeError(f"NVSHMEM initialization failed ({rc}) for PE {rank} of {world}")
    if lib.disagg_nvshmem_n_pes() != world or lib.disagg_nvshmem_my_pe() != rank:
        raise RuntimeError("NVSHMEM PE numbering does not match the torch.distributed group")
    _job = {"rank": rank, "world": world, "device": device.index}
    atexit.register(_finalize)
    return _job


def quantize_fp8(x: torch.Tensor):
    """Rows ``x [n, H]`` -> (``float8_e4m3fn [n, Hp]``, ``float32 scales [n, Hp/128]``) with one
    scale per 128 columns (``Hp``: H rounded up to 128, zero padded): ``x ≈ q * scale``."""
    n, H = x.shape
    Hp = -(-H // FP8_GROUP) * FP8_GROUP
    xf = torch.nn.functional.pad(x.float(), (0, Hp - H)).view(n, Hp // FP8_GROUP, FP8_GROUP)
    scale = xf.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    q = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(n, Hp), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, H: int, dtype: torch.dtype) -> torch.Tensor:
    n, Hp = q.shape
    x = q.float().view(n, Hp // FP8_GROUP, FP8_GROUP) * scale.unsqueeze(-1)
    return x.view(n, Hp)[:, :H].to(dtype)


class NvshmemTransport:
    """EP transport on NVSHMEM symmetric buffers (see the module docstring).

    Parameters
    ----------
    max_tokens : int
        Most tokens one rank dispatches per call; with ``top_k`` it sizes the receive slots
        (``max_tokens * top_k`` rows of ``hidden`` elements of ``dtype`` from every rank).
    hidden, top_k : int
        Row width and assignments per token.
    group : ProcessGroup, optional
        The expert-parallel group (torch.distributed must be initialized; one rank per GPU).
    dtype : torch.dtype
        Widest row element the transport moves (float32 by default).
    fp8_dispatch : bool
        Send the dispatched token rows as float8 e4m3 with one float32 scale per 128 columns
        (about half the bytes of bf16); the combine direction stays in full precision. Lossy:
        results then match the torch transport within the FP8 rounding, not exactly.
    device : torch.device, optional
        This rank's GPU (default: the current CUDA device).
    """

    def __init__(self, max_tokens: int, hidden: int, top_k: int = 1,
                 group: Optional[dist.ProcessGroup] = None, dtype: torch.dtype = torch.float32,
                 fp8_dispatch: bool = False, device: Optional[torch.device] = None):
        if not torch.cuda.is_available():
            raise RuntimeError("the NVSHMEM transport needs a CUDA device and torch sees none; "
                               "use transport='torch' (gloo) on CPU")
        self._lib = _load()  # raises when disagg was built without the library
        if not dist.is_initialized():
            raise RuntimeError("the NVSHMEM transport bootstraps from torch.distributed: call "
                               "init_process_group first (e.g. under torchrun)")
        if max_tokens < 1 or hidden < 1 or top_k < 1:
            raise ValueError(f"max_tokens, hidden and top_k must be >= 1, got {max_tokens}, "
                             f"{hidden}, {top_k}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda", torch.cuda.current_device())
        if self.device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {self.device}")
        self.group, self.fp8_dispatch = group, fp8_dispatch
        self.max_rows = max_tokens * top_k
        elem = torch.empty(0, dtype=dtype).element_size()
        row = hidden * elem
        if fp8_dispatch:
            hp = -(-hidden // FP8_GROUP) * FP8_GROUP
            row = max(row, self._fp8_row_bytes(hp))
        # the count exchange moves one row of int64 per local expert through the same slots
        self.slot_bytes = max(self.max_rows * row, 16 << 10)
        job = _bootstrap(group, self.device)
        self.rank, self.world_size = job["rank"], job["world"]
        with torch.cuda.device(self.device):
            self._handle = self._lib.disagg_nvshmem_create(self.slot_bytes)
        if not self._handle:
            raise RuntimeError(
                f"could not allocate {self.world_size} x {self.slot_bytes} bytes of NVSHMEM "
                "symmetric memory: lower max_tokens or raise NVSHMEM_SYMMETRIC_SIZE")
        self._epoch = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    @staticmethod
    def _fp8_row_bytes(hp: int) -> int:
        return -(-(hp + 4 * (hp // FP8_GROUP)) // 16) * 16

    def close(self):
        """Frees the symmetric buffers (collective: every rank must call it)."""
        if getattr(self, "_handle", None):
            torch.cuda.synchronize(self.device)
            self._lib.disagg_nvshmem_destroy(self._handle)
            self._handle = None

    def _move(self, rows: torch.Tensor, send_splits: List[int], recv_splits: List[int]) -> torch.Tensor:
        """The byte-level all-to-all of 2-D rows (any dtype) on the current stream."""
        if not self._handle:
            raise RuntimeError("NvshmemTransport is closed")
        R = self.world_size
        if len(send_splits) != R or len(recv_splits) != R:
            raise ValueError(f"send_splits and recv_splits need {R} entries, got "
                             f"{len(send_splits)} and {len(recv_splits)}")
        rows = rows.to(self.device).contiguous()
        row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
        if row_bytes == 0:
            raise ValueError(f"rows must have a non-zero width, got shape {tuple(rows.shape)}")
        most = max(list(send_splits) + list(recv_splits) + [0])
        if most * row_bytes > self.slot_bytes:
            raise ValueError(
                f"{most} rows of {row_bytes} bytes exceed the NVSHMEM slot of {self.slot_bytes} "
                "bytes: raise max_tokens (or top_k) of the transport")
        if sum(send_splits) != rows.shape[0]:
            raise ValueError(f"send_splits sum to {sum(send_splits)}, x has {rows.shape[0]} rows")
        offs = torch.tensor([0, *accumulate(send_splits), 0, *accumulate(recv_splits)],
                            dtype=torch.int64).to(self.device, non_blocking=True)
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        self._epoch += 1
        stream = torch.cuda.current_stream(self.device)
        # empty tensors may have a null data pointer: hand the kernels a valid address
        x_ptr = rows.data_ptr() or offs.data_ptr()
        o_ptr = out.data_ptr() or offs.data_ptr()
        rc = self._lib.disagg_nvshmem_all_to_all(
            self._handle, x_ptr, offs.data_ptr(), offs.data_ptr() + 8 * (R + 1), o_ptr, row_bytes,
            self._epoch, stream.cuda_stream)
        if rc != 0:
            raise RuntimeError(f"NVSHMEM all_to_all failed: {self._lib.disagg_nvshmem_error_string(rc)}")
        self.bytes_sent += (sum(send_splits) - send_splits[self.rank]) * row_bytes
        self.bytes_received += (sum(recv_splits) - recv_splits[self.rank]) * row_bytes
        return out

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        """``send [R, n]``: row r goes to rank r; returns ``[R, n]`` (row s from rank s)."""
        R = self.world_size
        got = self._move(send.to(torch.int64), [1] * R, [1] * R)
        return got.to(send.device, send.dtype)

    def all_to_all(self, x: torch.Tensor, send_splits: List[int], recv_splits: List[int]) -> torch.Tensor:
        return self._move(x, send_splits, recv_splits)

    def all_to_all_dispatch(self, x: torch.Tensor, send_splits: List[int],
                            recv_splits: List[int]) -> torch.Tensor:
        """The dispatch direction: FP8 rows with per-128 scales when ``fp8_dispatch``."""
        if not self.fp8_dispatch or not x.is_floating_point() or x.dim() != 2:
            return self._move(x, send_splits, recv_splits)
        n, H = x.shape
        q, scale = quantize_fp8(x.to(self.device))
        hp = q.shape[1]
        width = self._fp8_row_bytes(hp)
        packed = torch.zeros(n, width, dtype=torch.uint8, device=self.device)
        packed[:, :hp] = q.view(torch.uint8)
        packed[:, hp:hp + 4 * (hp // FP8_GROUP)] = scale.contiguous().view(torch.uint8).view(n, -1)
        got = self._move(packed, send_splits, recv_splits)
        m = got.shape[0]
        gq = got[:, :hp].contiguous().view(torch.float8_e4m3fn)
        gs = got[:, hp:hp + 4 * (hp // FP8_GROUP)].contiguous().view(torch.float32).view(m, -1)
        return dequantize_fp8(gq, gs, H, x.dtype)
