"""Train stage 1 (Q-Former, frozen image encoder) or stage 2 (Q-Former -> frozen LLM) with the same loop.

On a laptop:      minblip2-train --stage 1 --preset cpu --out_dir=runs/mine
                  minblip2-train --stage 2 --preset cpu --out_dir=runs/mine     (starts from runs/mine/stage1)
On 8 GPUs:        torchrun --standalone --nproc_per_node=8 -m minblip2.train --stage 1 --preset paper
Any field:        ... --stage1.lr=3e-4 --qformer.num_queries=32 --out_dir=runs/mine
What would run:   ... --dry_run   (parameter counts and a GPU memory estimate; nothing downloaded, no training)
(`minblip2-train` is `python -m minblip2.train`; torchrun takes the module.)

The recipe is BLIP-2's: AdamW (0.9, 0.98), weight decay 0.05 on matrices, linear warmup then cosine
decay, gradient clipping, optional bf16/fp16 autocast. Checkpoints hold the trainable weights
(safetensors) plus optimizer, scaler, step and RNG state, written atomically; a run resumes from its
latest checkpoint and continues exactly as if never interrupted (same batches, same dropout).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from . import dist, runtime
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from .config import Config, TrainConfig, check_llm_precision, config_from_command_line


# ----------------------------------------------------------------------------- schedule and optimiser


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup from 0 to t.lr over warmup_steps, then cosine decay to t.min_lr at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (ndim >= 2): none on biases, norms and the 0-D temperature. LAVIS's
    rule differs for one tensor: it skips decay for 1-D tensors and biases only, so it decays `temp`.

    Parameters named in `model.pretrained_names` (stage 1: the Q-Former's BERT-initialised ones; stage 2: what
    came from stage 1) learn at lr * t.pretrained_lr_scale; 1.0 = one learning rate, as in the paper.
    """
    slow = getattr(model, "pretrained_names", set())
    scale = getattr(t, "pretrained_lr_scale", 1.0)
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in n
        lr_scale = scale if n in slow else 1.0
        g = groups.setdefault((decay, n in slow), {"params": [], "weight_decay": t.weight_decay if decay else 0.0,
                                                   "lr_scale": lr_scale, "pretrained": n in slow})
        g["params"].append(p)
    params = [p for g in groups.values() for p in g["params"]]
    # the fused kernel (one op for all parameters) needs them all on one device type; ~0.1 s/step saved on CPU
    fused = {p.device.type for p in params} in ({"cuda"}, {"cpu"})
    return torch.optim.AdamW(list(groups.values()), lr=t.lr, betas=tuple(t.betas), fused=fused or None)


# ----------------------------------------------------------------------------- seeds


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, stage: int, task=None, resume: bool = True, stop_at: int | None = None,
          progress: bool = True, run_dir: str | Path | None = None, init_from: str | Path | None = None) -> Path:
    """Train `stage` (1 or 2) for cfg.stage{1,2}.max_steps; returns the run's stage directory.

    task: a `StageTask` (see tasks.py) -- the model, its data and its loss; built from cfg if None.
    stop_at: end early after this many steps (as if interrupted), e.g. to test resuming.
    init_from: stage 2 only, the stage-1 run directory to start from (default <out_dir>/stage1).
    Writes run_dir (default <out_dir>/stage<N>): checkpoints/, log.csv, losses.png.
    """
    from .tasks import build_task  # tasks imports the heavy model code
    from .tools.plots import plot_losses

    device = dist.setup(cfg.device)
    cfg = runtime.resolve_precision(cfg, device)  # "auto" -> this machine's precision; config.json records the choice
    t: TrainConfig = cfg.stage1 if stage == 1 else cfg.stage2
    check_compile(t, device)
    if stage == 2:
        check_llm_precision(cfg)
    seed_everything(t.seed + dist.rank())  # different dropout per process, same data order (see tasks.batch_indices)
    task = task or build_task(cfg, stage, device, stage1_dir=init_from)
    if stage == 1:
        check_loss_config(task.model, t)
    model = task.model.to(device)
    run_dir = Path(run_dir or Path(cfg.out_dir) / f"stage{stage}")
    ckpt_root = run_dir / "checkpoints"
    optimizer = build_optimizer(model, t)
    scaler = torch.amp.GradScaler(device.type) if t.amp == "fp16" else None

    if dist.world_size() > 1 and len(dist.processes_sharing(run_dir)) < dist.world_size() and dist.is_master():
        print(f"note: some processes do not see {run_dir} (no shared filesystem across the nodes?). Only rank 0 "
              f"writes checkpoints there; to resume, copy its checkpoints/ to every node first (docs/scaling.md)")
    start = 0
    if resume and (ckpt := agreed_checkpoint(ckpt_root)) is not None:
        start = load_checkpoint(ckpt, model, optimizer, scaler, task=task)
        if dist.is_master():
            print(f"resuming stage {stage} from {ckpt} (step {start})")
    log_rows = _read_log(run_dir / "log.csv", upto=start)

    train_model = model
    if dist.world_size() > 1:
        # a frozen phase leaves the pretrained weights without gradients for its steps (no_grad_for)
        train_model = wrap_ddp(model, device, task.has_unused_parameters or t.pretrained_frozen_steps > start)
    if t.compile:
        train_model = torch.compile(train_model)

    global_batch = t.batch_size * t.grad_accum * dist.world_size()
    if stage == 1 and t.grad_accum > 1 and dist.is_master():
        print(f"stage 1: ITC and ITM contrast each pair with the {t.batch_size * dist.world_size()} pairs of one "
              f"micro-batch x {dist.world_size()} process(es), not with the global batch of {global_batch} "
              f"(grad_accum={t.grad_accum} splits it); see docs/scaling.md, 'Negatives come from one micro-batch'")
    end = min(t.max_steps, stop_at) if stop_at is not None else t.max_steps
    batches = task.batches(start, end, t, device)  # this process's micro-batches, step by step (tasks.py: a DataLoader)
    model.train()
    bar = runtime.progress_bar(range(start, end), progress, desc=f"stage {stage}", initial=start, total=t.max_steps,
                            dynamic_ncols=True)
    overflows = 0  # fp16: consecutive steps whose gradients overflowed (the GradScaler skipped them)
    t0 = time.time()
    pretrained = [p for g in optimizer.param_groups if g.get("pretrained") for p in g["params"]]
    for step in bar:
        lr = lr_at(step, t)
        frozen = step < t.pretrained_frozen_steps  # the fresh weights learn alone first (see TrainConfig)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0) * (unfrozen_warmup(step, t) if g.get("pretrained") else 1.0)
        micro_batches = next(batches)
        sums = {}  # the logged losses, summed over micro-batches ON the device: no host sync per micro-batch
        for micro, mb in enumerate(micro_batches):
            sync = micro == t.grad_accum - 1 or dist.world_size() == 1
            ctx = nullcontext() if sync or not hasattr(train_model, "no_sync") else train_model.no_sync()
            with ctx, no_grad_for(pretrained if frozen else []):
                with runtime.autocast(t.amp, device):
                    out = task.loss(train_model, mb, device, generator=step_generator(t.seed, step, micro, device))
                loss = out["loss"] / t.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
            for k, v in out.items():
                v = torch.as_tensor(v.detach() if torch.is_tensor(v) else v, dtype=torch.float32, device=device)
                sums[k] = sums.get(k, 0.0) + v / t.grad_accum
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                         t.grad_clip if t.grad_clip > 0 else float("inf")))
        # ONE collective for all the logged values, on the run's device (NCCL reduces GPU tensors only); every
        # process then holds the same numbers and takes the same decisions below (no process stops alone)
        metrics = dict(zip(sums, dist.all_reduce_mean(torch.stack(list(sums.values()))).tolist()))
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if scaler:  # fp16: an overflow is the GradScaler's job -- it skips the step and halves its scale
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.get_scale() < scale
            overflows = overflows + 1 if skipped or not finite else 0
            if overflows >= t.max_overflow_steps:
                _nan_stop(stage, step, {**metrics, "grad_norm": grad_norm}, ckpt_root,
                          f"the GradScaler skipped {overflows} steps in a row (its scale fell to {scaler.get_scale():g}):"
                          f" the values are not finite at any scale")
        elif finite:
            optimizer.step()
        else:  # bf16 / fp32 have no scaler: a non-finite value is a real problem
            _nan_stop(stage, step, {**metrics, "grad_norm": grad_norm}, ckpt_root)
        optimizer.zero_grad(set_to_none=True)

        if "bad_images" in metrics:  # a count, not a mean: unreadable images replaced in this step, all processes
            metrics["bad_images"] = round(metrics["bad_images"] * t.grad_accum * dist.world_size())
        row = {"step": step + 1, "lr": lr, **{k: round(v, 6) for k, v in metrics.items()},
               "grad_norm": round(grad_norm, 4), "time": round(time.time() - t0, 2)}
        if scaler:
            row.update(loss_scale=scale, skipped=int(skipped))
        log_rows.append(row)
        done = step + 1
        ckpt = done % t.ckpt_every == 0 or done == end
        # every process's random state (a collective: all of them take part), so a resume is exact per process
        rng = dist.all_gather_object(rng_state()) if ckpt else None
        data_state = task.data_state() if ckpt and hasattr(task, "data_state") else None  # every process
        if dist.is_master():
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{lr:.1e}")
            # the log first, whenever a checkpoint follows: a resume keeps the log rows up to its checkpoint
            if ckpt or done % t.log_every == 0:
                _write_log(run_dir / "log.csv", log_rows)
            if ckpt:
                save_checkpoint(ckpt_root, done, model, optimizer, scaler, cfg, rng=rng, data_state=data_state)
        # no barrier per step: the next step's collectives wait for rank 0's checkpoint anyway
    if dist.is_master() and log_rows:
        _write_log(run_dir / "log.csv", log_rows)
        plot_losses(run_dir / "log.csv", run_dir / "losses.png", title=f"stage {stage}")
    bar.close()
    dist.barrier()  # once: no process leaves (e.g. on to stage 2, which reads it) before the last checkpoint is written
    return run_dir


def wrap_ddp(model, device, find_unused_parameters: bool) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over the TRAINABLE weights only. Wrapped whole, DDP broadcast every parameter and buffer from rank 0 at
    start -- stage 2's frozen OPT-2.7B: 5.3 GB to every process -- and the buffers again before every forward. The
    frozen weights come from the same files in every process, so here they are left out of DDP and only
    checked: a checksum per tensor, compared across processes, and only a tensor that differs is broadcast (a
    randomly initialised frozen model, seeded per process). No module here has buffers that training changes
    (no BatchNorm), so no buffer needs syncing during training either."""
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(model.named_buffers())
    sync_if_different(frozen)
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(frozen))
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


@torch.no_grad()
def sync_if_different(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Broadcast from rank 0 those of `tensors` whose checksum differs between processes; returns their names.
    The checksum: the float64 sum of the tensor and of every 7th element (no copy of the tensor is made), 16 bytes
    per tensor in two all-reduces, instead of the tensors themselves."""
    if not tensors or dist.world_size() == 1:
        return []
    names = list(tensors)
    device = next(iter(tensors.values())).device
    sums = torch.stack([torch.stack([t.sum(dtype=torch.float64), t.reshape(-1)[::7].sum(dtype=torch.float64)])
                        for t in tensors.values()]).to(device)
    low, high = sums.clone(), sums.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    differ = [n for n, d in zip(names, (low != high).any(dim=1).tolist()) if d]
    for n in differ:
        torch.distributed.broadcast(tensors[n], src=0)
    if differ and dist.is_master():
        print(f"note: {len(differ)} frozen tensor(s) differed between processes ({differ[0]}, ...): rank 0's were "
              f"broadcast (a frozen model with random weights?)")
    return differ


def agreed_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint every process resumes from: rank 0's latest, which every process must hold too.

    Each process reads ckpt_root on its own machine. Only rank 0 writes checkpoints, so on many nodes without a
    shared filesystem the others see none (or an older one, copied earlier): each process resuming from its own
    latest then ran a different number of steps and the job hung in a collective. Here rank 0 decides, and every
    process compares what it holds with rank 0's choice; if any differs, all of them stop with the same error
    (a collective: nobody is left waiting)."""
    mine = latest_checkpoint(ckpt_root)
    names = dist.all_gather_object(mine.name if mine is not None else None)  # every process's latest, rank order
    chosen = names[0]
    if any(n != chosen for n in names):
        held = ", ".join(f"process {r}: {n or 'none'}" for r, n in enumerate(names))
        raise RuntimeError(
            f"the processes would resume from different checkpoints in {ckpt_root} ({held}); rank 0 decides, and "
            f"every process must hold its choice. Only rank 0 writes checkpoints: put out_dir on a filesystem every "
            f"node shares, or copy rank 0's {ckpt_root} (with its `latest`) to every node before resuming. "
            f"Nothing was trained.")
    return mine


@contextmanager
def no_grad_for(params):
    """Frozen for the duration: no gradient is computed for `params`, so autograd skips the backward through them,
    they add nothing to clip_grad_norm_, and AdamW leaves them and their moments alone (a parameter without a
    gradient is skipped). requires_grad comes back on after, so checkpoints and the optimizer see them as usual."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def unfrozen_warmup(step: int, t: TrainConfig) -> float:
    """The lr factor of the pretrained weights after `pretrained_frozen_steps`: a linear warmup over warmup_steps
    from the step they start training, as at the start of the run (their AdamW moments start empty there, so
    Adam's first updates are full-size in every coordinate). 1 when nothing is frozen; 0 while frozen."""
    if t.pretrained_frozen_steps == 0:
        return 1.0
    since = step - t.pretrained_frozen_steps
    return 0.0 if since < 0 else min(1.0, (since + 1) / max(1, t.warmup_steps))


def step_generator(seed: int, step: int, micro: int, device) -> torch.Generator:
    """The random stream of stage 1's ITM negative sampling for one micro-batch: a function of (seed, step,
    micro-batch) only, the same in every process. So the negatives do not depend on the number of processes
    (losses.sample_hard_negatives samples the whole global batch in each), nor on resuming."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0]))
    return g


def check_compile(t: TrainConfig, device: torch.device):
    """torch.compile of the training step: measured 1.47x faster on an H100 (torch 2.11); on CPUs it is refused."""
    if t.compile and device.type != "cuda":
        raise ValueError(
            f"compile=True needs a CUDA GPU: on CPU (torch {torch.__version__}) the compiled stage-1 step crashes in "
            f"backward (inductor: \"TypeError: expected Tensor() for op: input\"), and it would not pay off there "
            f"anyway. Drop --stage1.compile / --stage2.compile on this machine; keep it on GPUs (1.47x faster "
            f"stage-1 steps measured on an H100).")


def check_loss_config(model, t: TrainConfig):
    """A Stage1Model computes its losses from the Stage1Config it was built with (model.scfg), not from the config
    train() is given. If they disagree on the loss, the run would train one loss and record another in config.json."""
    built = getattr(model, "scfg", None)
    if built is None or built is t:
        return
    fields = ("losses", "query_sim_weight", "label_smoothing", "clamp_temp", "itc_gather_grad", "fast_passes")
    differ = [f"{f}: model {getattr(built, f)!r}, cfg {getattr(t, f)!r}" for f in fields
              if getattr(built, f) != getattr(t, f)]
    if differ:
        raise ValueError(f"the model was built with another stage-1 loss than cfg.stage1 ({'; '.join(differ)}): "
                         f"train() would train the model's and record the config's. Build the model from this "
                         f"config, or set model.scfg = cfg.stage1 before training.")


def _nan_stop(stage, step, values: dict, ckpt_root, why: str = ""):
    vals = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    last = latest_checkpoint(ckpt_root)
    raise FloatingPointError(
        f"stage {stage}, step {step + 1}: non-finite loss/gradient ({vals}){'; ' + why if why else ''}. Training "
        f"stopped before writing anything for this step; the last good checkpoint is {last or 'none'}. Try a lower "
        f"lr, amp='bf16' instead of 'fp16', or a smaller grad_clip.")


def _read_log(path: Path, upto: int) -> list[dict]:
    """The log rows of an interrupted run, cut back to the checkpoint we resume from."""
    if upto == 0 or not path.exists():
        return []
    with open(path) as f:
        rows = [{k: int(v) if k == "step" else float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= upto]


def _write_log(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="minblip2-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--preset", default="cpu", help="cpu | paper | gpu24")
    p.add_argument("--init_from", default="", help="stage 2: the stage-1 run directory (default: <out_dir>/stage1)")
    p.add_argument("--no_resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument("--dry_run", action="store_true",
                   help="build the preset on the meta device (no weights), print parameter counts and a GPU "
                        "memory estimate per batch size, and exit without training")
    args, overrides = p.parse_known_args(argv)
    cfg = config_from_command_line(args.preset, overrides)  # a mistake: one line, exit status 2
    if args.dry_run:
        from .tools.dryrun import dry_run, format_report

        print(format_report(dry_run(cfg, args.stage)))
        return 0
    try:
        train(cfg, args.stage, resume=not args.no_resume, init_from=args.init_from or None)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
