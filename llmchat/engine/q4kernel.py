"""llmchat's own int4 x int8 decode kernel (q4kernel.c), compiled on this machine the first time it is used.

Why: a 1B model's decode step is its int4 matrix products, and PyTorch's int4 kernel
(`_weight_int4pack_mm_for_cpu`) takes bfloat16 activations and dequantizes every weight to float:
compute-bound at about 10 GB/s on 2 cores, half of llama.cpp's decode rate. This kernel does what
llama.cpp does: quantize the activations to int8 per group of 32 and multiply integer codes
(AVX-512 VNNI or AVX2), over the int4 layout's own `nibbles` and `scale_zero` buffers, so it
costs no memory. Measured: `benchmarks/int4_kernel.py`.

It is a plain C file built with the system's C compiler (`$CC`, else `cc`) into the user cache
(about a second; no PyTorch headers), loaded with ctypes and run on the OpenMP runtime torch has
already loaded. Which variant: torch's own CPU capability (`ATEN_CPU_CAPABILITY=avx2` selects the
AVX2 build on an AVX-512 machine, as it does torch's kernels) and whether the CPU has VNNI. It is
on by default; switched off (`LLMCHAT_INT4_KERNEL=0`, see `enabled`), without AVX2 or without a
compiler, `available()` is None and the packed layers use PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("q4kernel.c")
ENV_SWITCH = "LLMCHAT_INT4_KERNEL"  # "0" switches llmchat's kernel off (see `enabled`)
_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512-vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
}
_CDLL_ARGS = [
    ctypes.c_void_p,  # x
    ctypes.c_int64,  # M
    ctypes.c_int64,  # K
    ctypes.c_void_p,  # nibbles
    ctypes.c_void_p,  # scales [N, K/32] bfloat16
    ctypes.c_void_p,  # zeros [N, K/32] bfloat16, or NULL for all 0
    ctypes.c_int64,  # N
    ctypes.c_void_p,  # bias or NULL
    ctypes.c_void_p,  # y
    ctypes.c_int,  # threads
]

_EXPERTS_ARGS = [
    *_CDLL_ARGS[:6],  # x, M, K, nibbles, scales, zeros (stacked over experts)
    ctypes.c_int64,  # N
    ctypes.c_void_p,  # experts [k] int64
    ctypes.c_int64,  # k
    ctypes.c_void_p,  # y
    ctypes.c_int,  # threads
]

_INT8_ARGS = [
    ctypes.c_void_p,  # x [M, K] float32
    ctypes.c_int64,  # M
    ctypes.c_int64,  # K
    ctypes.c_void_p,  # codes [N, K] int8
    ctypes.c_void_p,  # scales [N] float32
    ctypes.c_int64,  # N
    ctypes.c_void_p,  # bias or NULL
    ctypes.c_void_p,  # y
    ctypes.c_int,  # threads
]

_SCORES_ARGS = [
    ctypes.c_void_p,  # q [H, D]
    ctypes.c_int64,  # H
    ctypes.c_int64,  # KV
    ctypes.c_int64,  # D
    ctypes.c_void_p,  # keys
    ctypes.c_int64,  # head stride (elements)
    ctypes.c_int64,  # L
    ctypes.c_float,  # scale
    ctypes.c_void_p,  # scores [H, L]
    ctypes.c_int,  # threads
]

_VALUES_ARGS = [
    ctypes.c_void_p,  # weights [H, L]
    ctypes.c_int64,  # H
    ctypes.c_int64,  # KV
    ctypes.c_int64,  # D
    ctypes.c_void_p,  # values
    ctypes.c_int64,  # head stride (elements)
    ctypes.c_int64,  # L
    ctypes.c_void_p,  # out [H, D]
    ctypes.c_void_p,  # partial [threads, H, D]
    ctypes.c_int,  # threads
]

_DEQUANTIZE_ARGS = [
    ctypes.c_void_p,  # nibbles
    ctypes.c_void_p,  # scales
    ctypes.c_void_p,  # zeros or NULL
    ctypes.c_int64,  # N
    ctypes.c_int64,  # K
    ctypes.c_void_p,  # out
    ctypes.c_int,  # bfloat16?
    ctypes.c_int,  # threads
]


_POINTER, _POSITION, _THREADS = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # every entry point of q4kernel.c (all return void)
    "llmchat_int4_mm": _CDLL_ARGS,
    "llmchat_int4_experts": _EXPERTS_ARGS,
    "llmchat_int4_dequantize": _DEQUANTIZE_ARGS,
    "llmchat_int8_float_mm": _INT8_ARGS,
    "llmchat_attention_scores": _SCORES_ARGS,
    "llmchat_attention_values": _VALUES_ARGS,
    # (the DecodeLayer of fused_decode.py, x, cos, sin | weights, position, [y], threads)
    "llmchat_decode_layer_in": [_POINTER, _POINTER, _POINTER, _POINTER, _POSITION, _THREADS],
    "llmchat_decode_layer_out": [_POINTER, _POINTER, _POINTER, _POSITION, _POINTER, _THREADS],
}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def enabled() -> bool:
    """On unless switched off (`LLMCHAT_INT4_KERNEL=0`): then PyTorch's kernels, to compare against."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def variant() -> str | None:
    """The build the packed layers use: `cpu_variant()` when the kernel is switched on, else None."""
    return cpu_variant() if enabled() else None


def cpu_variant() -> str | None:
    """The build for this CPU and torch's capability setting, or None where the kernel does not apply."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if capability.startswith("AVX512") and {"avx512_vnni", "avx512vl", "avx512bw"} <= flags:
        return "avx512-vnni"
    if capability in ("AVX2", "AVX512") or capability.startswith("AVX512"):
        return "avx2" if {"avx2", "fma"} <= flags else None
    return None


def _matrix_args(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> tuple:
    """The arguments both products start with: x (contiguous float32 [M, K]), M, K, the matrix's buffers."""
    rows, inner = x.shape
    return (
        x.data_ptr(),
        rows,
        inner,
        nibbles.data_ptr(),
        scales.data_ptr(),
        None if zeros is None else zeros.data_ptr(),
    )


@dataclass(frozen=True)
class Int4Kernel:
    """The loaded kernel: `variant` names the build (for `llmchat info` and `bench --json`)."""

    variant: str
    library: ctypes.CDLL

    def mm(
        self,
        x: torch.Tensor,
        nibbles: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [M, K] float32 times the int4 matrix (nibbles [N, K/2]; scales, zeros [N, K/32] bfloat16,
        zeros None where all are 0), plus bias: [M, N] float32."""
        x = x.contiguous()
        rows, inner = x.shape
        out_features = nibbles.shape[0]
        y = torch.empty((rows, out_features), dtype=torch.float32)
        self.library.llmchat_int4_mm(
            *_matrix_args(x, nibbles, scales, zeros),
            out_features,
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            torch.get_num_threads(),
        )
        return y

    def experts(
        self,
        x: torch.Tensor,
        nibbles: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        ids: torch.Tensor,
    ) -> torch.Tensor:
        """Row i: x's row i (or its only row) times expert ids[i] of a stack (nibbles [E, N, K/2];
        scales, zeros [E, N, K/32]): [k, N] float32, in one call for all k."""
        x = x.contiguous()
        rows, inner = x.shape
        ids = ids.to(torch.int64).contiguous()
        count, out_features = ids.shape[0], nibbles.shape[1]
        if rows not in (1, count):
            raise ValueError(f"{rows} input rows for {count} experts")
        y = torch.empty((count, out_features), dtype=torch.float32)
        self.library.llmchat_int4_experts(
            *_matrix_args(x, nibbles, scales, zeros),
            out_features,
            ids.data_ptr(),
            count,
            y.data_ptr(),
            torch.get_num_threads(),
        )
        return y

    def int8_mm(
        self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [M, K] float32 times int8 codes [N, K] with float32 row scales, plus bias, all in float32
        (the output projection: PackedLinear's int8-fp32out layout): [M, N] float32."""
        x = x.contiguous()
        rows, inner = x.shape
        out_features = codes.shape[0]
        y = torch.empty((rows, out_features), dtype=torch.float32)
        self.library.llmchat_int8_float_mm(
            x.data_ptr(),
            rows,
            inner,
            codes.data_ptr(),
            scales.data_ptr(),
            out_features,
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            torch.get_num_threads(),
        )
        return y

    def attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """One decode step's attention in float32: q [H, 1, D] over keys, values [KV, L, D] (views of a
        cache whose rows of D are contiguous); mask [1, L] (True: may attend) or None. [H, 1, D] float32."""
        q = q.contiguous()  # held in a name: a temporary's memory would be freed before the call reads it
        heads, _, head_dim = q.shape
        kv_heads, length = keys.shape[:2]
        threads = torch.get_num_threads()
        scores = torch.empty((heads, length), dtype=torch.float32)
        self.library.llmchat_attention_scores(
            q.data_ptr(), heads, kv_heads, head_dim, keys.data_ptr(), keys.stride(0), length,
            scale, scores.data_ptr(), threads,
        )  # fmt: skip
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = torch.empty((heads, 1, head_dim), dtype=torch.float32)
        partial = torch.empty((threads, heads, head_dim), dtype=torch.float32)
        self.library.llmchat_attention_values(
            weights.data_ptr(), heads, kv_heads, head_dim, values.data_ptr(), values.stride(0), length,
            out.data_ptr(), partial.data_ptr(), threads,
        )  # fmt: skip
        return out

    def dequantize(
        self, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, out: torch.Tensor
    ) -> torch.Tensor:
        """W [N, K] into `out` (float32 or bfloat16, contiguous): what a prefill chunk multiplies."""
        if out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
            raise ValueError("dequantize writes a contiguous float32 or bfloat16 matrix")
        rows, half = nibbles.shape[-2:]
        if out.shape != (rows, 2 * half):
            raise ValueError(f"out is {tuple(out.shape)}, the matrix {rows}x{2 * half}")
        self.library.llmchat_int4_dequantize(
            nibbles.data_ptr(),
            scales.data_ptr(),
            None if zeros is None else zeros.data_ptr(),
            rows,
            2 * half,
            out.data_ptr(),
            int(out.dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
        return out


class Scratch:
    """The matrix a prefill chunk's int4 weights are dequantized into, one per process: a prefill
    dequantizes one matrix at a time, and allocating each afresh cost its page faults every time.
    `reserve` makes it at load, for the model's largest matrix (the memory estimate counts it as
    activations), so it is not made mid-prefill among short-lived tensors, where it held glibc's heap
    from shrinking. Hold `lock` from `matrix` until the product that reads it is done."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._held: dict[torch.dtype, torch.Tensor] = {}

    def reserve(self, size: int, dtype: torch.dtype) -> None:
        held = self._held.get(dtype)
        if held is None or held.numel() < size:
            self._held[dtype] = torch.empty(size, dtype=dtype)

    def matrix(self, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        """A [rows, columns] view of the scratch, grown when a larger one is asked for."""
        self.reserve(rows * columns, dtype)
        return self._held[dtype][: rows * columns].view(rows, columns)


scratch = Scratch()


@functools.cache
def prefill_dtype() -> torch.dtype:
    """What a prefill chunk's GEMM runs in with this kernel: bfloat16 where the CPU multiplies it natively
    (AVX512-BF16 or AMX: 3.5x float32's rate measured on 2 Zen 4 cores, 512x2048 by 2048x16384), else float32."""
    native = {"avx512_bf16", "amx_bf16"} & _cpu_flags()
    return torch.bfloat16 if variant() == "avx512-vnni" and native else torch.float32


class KernelBuildError(RuntimeError):
    pass


def _build(target: Path, flags: list[str]) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelBuildError("no C compiler (cc, gcc, or $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    command = [compiler, "-O3", "-shared", "-fPIC", "-fopenmp", *flags, str(SOURCE), "-o", str(partial)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"{compiler}: {exc}") from None
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise KernelBuildError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
    partial.replace(target)  # atomic: another process sees the whole library or none


def _library_path(name: str, flags: list[str]) -> Path:
    from llmchat.paths import cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"int4-{name}-{digest}.so"


@functools.cache
def _load(name: str) -> Int4Kernel | None:
    flags = _FLAGS[name]
    try:
        path = _library_path(name, flags)
        if not path.exists():
            _build(path, flags)
        library = ctypes.CDLL(str(path))
    except (KernelBuildError, OSError) as exc:
        _failures[name] = str(exc)
        return None
    for function, argtypes in _SIGNATURES.items():
        entry = getattr(library, function)
        entry.argtypes, entry.restype = argtypes, None
    return Int4Kernel(name, library)


_failures: dict[str, str] = {}


@functools.cache
def available() -> Int4Kernel | None:
    """The kernel for this machine, built on first use; None where it does not apply or could not be built.

    Decided once per process (`available.cache_clear()` makes it look again, for tests)."""
    name = variant()
    return None if name is None else _load(name)


def describe() -> str:
    """In words, for `llmchat info` and `bench --json`: which int4 decode kernel the packed layers use."""
    name = variant()
    if name is None:
        switched_off = f" (llmchat's own is off: {ENV_SWITCH}=0)" if cpu_variant() is not None and not enabled() else ""
        return "PyTorch's int4 kernel" + switched_off
    if available() is None:
        return f"PyTorch's int4 kernel (llmchat's {name} kernel did not build: {_failures.get(name, '?')})"
    return f"llmchat int4 x int8 ({name})"
