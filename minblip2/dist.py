"""Distributed helpers that degrade to one process.

Launch with `torchrun --nproc_per_node=N ...`: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and
`setup()` joins the process group (NCCL on GPU, gloo on CPU). Run plainly with `python ...` and every
helper here acts as if world_size == 1 -- no bare `dist.get_rank()` that crashes single-process runs.

Every tensor handed to a collective (all_reduce, all_gather, ...) must live on this process's device: NCCL
reduces GPU tensors only, and a CPU tensor such as `torch.tensor(loss_value)` kills a multi-GPU run at its
first step. gloo on CPUs accepts anything, so tests/test_ddp.py checks this explicitly.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

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
    """Wait for every process. NCCL's barrier runs on a GPU: name this process's (set by `setup`), or NCCL guesses
    one from the rank and can hang or use the wrong GPU."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] for any picklable obj (e.g. each process's RNG state); [obj] alone.
    torch.distributed pickles it into a byte tensor on the right device itself (the current GPU under NCCL)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's obj in every process (any picklable value); obj itself in one process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def processes_sharing(directory) -> list[int]:
    """The ranks that see the same `directory` as this process, this one included, in order: all of them on a
    shared filesystem, this node's on node-local disks. Found by looking, not assumed: every process creates a
    file named by its rank there, and lists whose files it sees. A collective (every process calls it).

    Where the answers do not form clean groups (a filesystem that shows some processes' files to some), every
    process counts as alone: the callers then do duplicate work, never wrong work."""
    if world_size() == 1:
        return [0]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = broadcast_object(f"{os.getpid()}-{time.time_ns()}")  # one name for this probe in every process
    mine = directory / f".probe-{token}-{rank()}"
    mine.touch()
    barrier()  # every probe file exists before anyone looks
    seen = [r for r in range(world_size()) if (directory / f".probe-{token}-{r}").exists()]
    views = all_gather_object(seen)  # also: everyone has looked before anyone deletes
    mine.unlink(missing_ok=True)
    clean = all(views[m] == views[r] for r in range(world_size()) for m in views[r])
    return views[rank()] if clean else [rank()]


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0; no gradient flows back (LAVIS's concat_all_gather)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def rows_wanted(x: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """x_all[wanted[rank()]], where x_all is every process's x (B rows each) concatenated in rank order, moving only
    those rows: each process sends every other one the rows of its own that it wants (one all_to_all), instead of
    every process receiving all W*B rows. wanted: (W, K) global row indices, every process's, known to all.
    No gradient flows back (use it for frozen inputs)."""
    if world_size() == 1:
        return x[wanted[0]]
    B, W, me = x.shape[0], world_size(), rank()
    owner = wanted // B  # (W, K): which process holds each wanted row
    send_rows = [wanted[r][owner[r] == me] - me * B for r in range(W)]  # mine that process r wants, in its order
    send = torch.cat([x[i] for i in send_rows]).contiguous()
    recv = x.new_empty((wanted.shape[1], *x.shape[1:]))
    dist.all_to_all_single(recv, send, output_split_sizes=torch.bincount(owner[me], minlength=W).tolist(),
                           input_split_sizes=[len(i) for i in send_rows])
    # recv holds my wanted rows grouped by the process they came from, each group in my order: put them back
    order = torch.argsort(owner[me], stable=True)
    out = torch.empty_like(recv)
    out[order] = recv
    return out


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
    """The mean of x over processes. x must live on this process's device (a GPU under NCCL): NCCL has no CPU
    backend, so a CPU tensor here kills a multi-GPU run ("No backend type associated with device type cpu")."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()
