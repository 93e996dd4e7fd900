"""Distributed helpers that degrade to one process.

Launch with `torchrun --nproc_per_node=N ...`: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and
`setup()` joins the process group (NCCL on GPU, gloo on CPU). Run plainly with `python ...` and every
helper here acts as if world_size == 1 -- no bare `dist.get_rank()` that crashes single-process runs.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_master() -> bool:
    """Only rank 0 logs, plots and writes checkpoints."""
    return rank() == 0


def progress_bar(iterable, show: bool = True, **kw):
    """A tqdm bar on the master process only. Never passes disable=False, so TQDM_DISABLE=1 silences it."""
    from tqdm.auto import tqdm

    if not (show and is_master()):
        kw["disable"] = True
    return tqdm(iterable, **kw)


def autocast(amp: str, device):
    """The autocast context for a config's `amp` ("none", "bf16", "fp16") on `device` (a no-op for "none")."""
    dtypes = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:  # a typo must not quietly train in fp32
        raise ValueError(f"amp={amp!r}: choose one of {list(dtypes)} (e.g. --stage1.amp=bf16)")
    dtype = dtypes[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def setup(device: str = "auto") -> torch.device:
    """Join the process group if launched by torchrun; return the device this process should use."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp and not is_distributed():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if device.startswith("cuda") and ddp:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0; no gradient flows back (LAVIS's concat_all_gather)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        # every process holds a gradient for every slice: sum them, keep ours
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[rank()]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0, letting gradients flow back to each process's slice."""
    if world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()
