"""What every loop here needs: the numeric precision for this machine, the autocast context for a config's `amp`,
and a progress bar that only the master process shows (under torchrun, N bars on one terminal are noise).

Precision per machine. bf16 halves the bytes and, on hardware built for it, multiplies the matmul rate: GPUs from
Ampere on, and Intel CPUs with AMX (bf16 matmuls ~5x fp32's). Most learners' CPUs (Intel Core, AMD Ryzen, Apple
silicon, Xeons without AMX) have no fast bf16 matmul: there bf16 is no faster than fp32 (AVX512-BF16) or hundreds of
times slower (AVX2 only, where it falls back to scalar code). So the cpu preset says amp="auto" and llm.dtype="auto",
and `resolve_precision` decides once per machine by measuring a matmul in each dtype (`cpu_matmul_rates`, cached in
the cache dir). An explicit setting ("none", "bf16", "fp16", "float32", ...) is always used as given.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import platform
import time

import torch

from . import dist

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", *AMP_DTYPES)
BF16_MIN_SPEEDUP = 1.5  # bf16 on a CPU only when its matmul is at least this much faster than fp32's (autocast
# pays for casts and fp32 reductions, so a small matmul lead does not make a faster step: bench/results.md)


# ----------------------------------------------------------------------------- precision for this machine


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _matmul_gflops(dtype: torch.dtype, n: int = 384, budget_s: float = 0.5) -> float:
    """GFLOP/s of an n x n matmul in `dtype` on this CPU: the best of a few calls within about `budget_s`."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up (kernel selection, first-touch)
    best, spent = float("inf"), 0.0
    for _ in range(7):
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:  # a slow dtype is slow enough to tell after one call
            break
    return 2 * n**3 / best / 1e9


def _machine_key() -> str:
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    sizes = ",".join(map(str, MATMUL_SIZES))  # measurements made at other sizes are not reused
    return f"{_cpu_name()}|torch {torch.__version__}|{torch.get_num_threads()} threads|isa {isa}|n {sizes}"


MATMUL_SIZES = (384, 1024)


def _best_rate(dtype: torch.dtype) -> float:
    """The best GFLOP/s over MATMUL_SIZES. Small products alone mislead: with 2 threads on a busy machine a 384 x 384
    fp32 product ran at 7-20 GFLOP/s where 1024 x 1024 ran at 366, and the CPU was judged faster in bf16 than fp32
    when it was 1.8x slower. A dtype under 1 GFLOP/s at the small size (bf16 without hardware support falls back
    to scalar code: 0.3 GFLOP/s on an AVX2-only CPU) is not timed at the large one, where one call takes seconds."""
    best = 0.0
    for n in MATMUL_SIZES:
        best = max(best, _matmul_gflops(dtype, n))
        if best < 1.0:
            break
    return best


@functools.lru_cache(maxsize=None)
def cpu_matmul_rates(cache_dir=None) -> dict:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s, "machine": ...} of this CPU, measured once (well under a second on most
    machines) and cached in <cache dir>/cpu-precision.json per CPU model, torch version, thread count and
    ONEDNN_MAX_CPU_ISA."""
    from .config import default_cache_dir

    from pathlib import Path

    path = Path(cache_dir or default_cache_dir()) / "cpu-precision.json"
    key = _machine_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]
    rates = {"fp32": round(_best_rate(torch.float32), 1), "bf16": round(_best_rate(torch.bfloat16), 1), "machine": key}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({**cached, key: rates}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: measure again next time
    return rates


def cpu_bf16_is_faster() -> bool:
    r = cpu_matmul_rates()
    return r["bf16"] >= BF16_MIN_SPEEDUP * r["fp32"]


def resolve_amp(amp: str, device) -> str:
    """A config's `amp` with "auto" replaced by this machine's choice: CUDA: bf16 where the GPU has it (Ampere on),
    else fp16; CPU: bf16 where its matmul is >= 1.5x fp32's (AMX), else none (fp32); other devices: none."""
    if amp not in AMP_CHOICES:  # a typo must not quietly train in fp32
        raise ValueError(f"amp={amp!r}: choose one of {list(AMP_CHOICES)} (e.g. --stage1.amp=bf16)")
    if amp != "auto":
        return amp
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_bf16_is_faster() else "none"
    return "none"


def resolve_dtype(dtype: str, device) -> str:
    """A frozen model's dtype with "auto" replaced: bfloat16 where `resolve_amp("auto")` picks bf16 (a bf16 model
    under bf16 autocast is not re-cast at every forward), float16 on a GPU without bf16, else float32."""
    if dtype != "auto":
        return dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(resolve_amp("auto", device), "float32")


def resolve_precision(cfg, device, log: bool = True):
    """A copy of `cfg` with every "auto" precision (stage1.amp, stage2.amp, llm.dtype) replaced by this machine's
    choice; prints what auto chose and why (master process). The copy is what config.json records."""
    cfg = copy.deepcopy(cfg)
    chosen = []
    for section, name, resolve in (("stage1", "amp", resolve_amp), ("stage2", "amp", resolve_amp),
                                   ("llm", "dtype", resolve_dtype)):
        obj = getattr(cfg, section)
        if getattr(obj, name) == "auto":
            setattr(obj, name, resolve(getattr(obj, name), device))
            chosen.append(f"{section}.{name}={getattr(obj, name)}")
    if chosen and log and dist.is_master():
        print(f"precision: auto chose {', '.join(chosen)} ({precision_reason(device)})", flush=True)
    return cfg


def precision_reason(device) -> str:
    kind = torch.device(device).type
    if kind == "cuda":
        return f"{torch.cuda.get_device_name()}: bf16 {'supported' if torch.cuda.is_bf16_supported() else 'not supported'}"
    if kind != "cpu":
        return f"{kind}: fp32"
    r = cpu_matmul_rates()
    verdict = "bf16 is faster" if cpu_bf16_is_faster() else "fp32 is faster"
    return (f"this CPU multiplies matrices at {r['bf16']:g} GFLOP/s in bf16 and {r['fp32']:g} GFLOP/s in fp32: "
            f"{verdict}; set --stage1.amp / --stage2.amp / --llm.dtype to override")


# ----------------------------------------------------------------------------- autocast and progress


def autocast(amp: str, device):
    """The autocast context for a config's `amp` ("auto", "none", "bf16", "fp16") on `device` (a no-op for "none")."""
    dtype = AMP_DTYPES[resolve_amp(amp, device)]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def progress_bar(iterable, show: bool = True, **kw):
    """A tqdm bar on the master process only. Never passes disable=False, so TQDM_DISABLE=1 silences it."""
    from tqdm.auto import tqdm

    if not (show and dist.is_master()):
        kw["disable"] = True
    return tqdm(iterable, **kw)
