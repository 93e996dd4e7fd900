"""Bench: does the data path keep up? train()'s loop vs the same steps on batches already in device memory.

    .venv/bin/python bench/data_path.py [--quick] [--device cuda] [--workers N] [--batch B] [--preset cpu]

For each kind of training data
  - cached:   features.py's memory-mapped fp16 bank, rows gathered by index in the DataLoader, pinned, copied;
  - computed: JPEGs decoded and cropped to uint8 in the DataLoader's workers, the frozen encoder on the batch;
it times STEPS training steps (forward, backward, clipping, AdamW: what train() does) two ways, alternating
in one process, round after round:
  - loop:   micro-batches from task.batches() -- the DataLoader train() uses -- as they come;
  - staged: the same steps (same samples) with every micro-batch fetched and moved to the device before the
            clock starts (for "computed" the encoder still runs: only decoding, cropping and copying go away).
ratio = staged time / loop time, the median over rounds of the per-round ratio: the fraction of the
model's own speed that the loop delivers (1.0 = the data path costs nothing; the issue's GPU target for cached
features is >= 0.8). `bench()` is importable (scripts/gpu_check.py can call it on a GPU) and returns a dict.
The data is coco-mini's train split ($MINBLIP2_DATA or --data-root).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from minblip2 import runtime  # noqa: E402
from minblip2.config import get_preset  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model, opt, task, micro_batches, t, device):
    for mb in micro_batches:
        with runtime.autocast(t.amp, device):
            out = task.loss(model, mb, device)
        (out["loss"] / len(micro_batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)


def _on_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def bench(cfg=None, device=None, kinds=("cached", "computed"), steps: int = 3, rounds: int = 4, warmup: int = 1,
          batch: int | None = None, workers: int | None = None, quiet: bool = False, model=None,
          tokenizer=None) -> dict:
    """{kind: {"loop_samples_per_s", "staged_samples_per_s", "ratio": {median, q1, q3}, ...}} (see the module doc).
    cfg: a Config (default: the cpu preset); batch / workers override cfg's stage-1 batch size / data.num_workers.
    model, tokenizer: a Stage1Model and its tokenizer to time (default: built from cfg; scripts/gpu_check.py passes
    a random paper-shape model and a made-up tokenizer, so no hub is needed)."""
    from minblip2.tasks import ImageTextData, Stage1Task, build_stage1_model
    from minblip2.train import build_optimizer

    cfg = cfg or get_preset("cpu")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t = cfg.stage1
    if batch:
        t.batch_size = batch
    if workers is not None:
        cfg.data.num_workers = workers
    cfg.data.augmented_views = 0  # the center crops suffice to time the path (and keep the first-run cache small)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if model is None:
        model, tokenizer = build_stage1_model(cfg)
    model = model.to(device).train()
    opt = build_optimizer(model, t)
    out = {"device": str(device), "batch": t.batch_size, "grad_accum": t.grad_accum, "steps_per_round": steps,
           "rounds": rounds, "amp": t.amp}
    for kind in kinds:
        data = ImageTextData.build(cfg, "train", kind == "cached", device)
        task = Stage1Task(model, data, tokenizer=tokenizer, max_text_len=cfg.data.max_text_len)
        total = (warmup + rounds) * steps  # round r runs steps r*steps ... both ways: the same captions, same cost
        staged = [[_on_device(mb, device) for mb in s] for s in task.batches(0, total, t, device)]
        loop = task.batches(0, total, t, device)  # one DataLoader for all rounds, as in a training run
        times = {"loop": [], "staged": []}
        for r in range(warmup + rounds):
            for name in ("loop", "staged") if r % 2 == 0 else ("staged", "loop"):
                _sync(device)
                t0 = time.perf_counter()
                for i in range(r * steps, (r + 1) * steps):
                    _step(model, opt, task, next(loop) if name == "loop" else staged[i], t, device)
                _sync(device)
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
            if r >= warmup:
                say(f"  [data path, {kind}] round {r - warmup + 1}/{rounds}: loop {times['loop'][-1]:.2f} s, "
                    f"staged {times['staged'][-1]:.2f} s")
        loop.close()
        samples = steps * t.batch_size * t.grad_accum
        ratios = [s / lp for s, lp in zip(times["staged"], times["loop"])]
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        out[kind] = {"workers": data.num_workers, "loop_samples_per_s": samples / statistics.median(times["loop"]),
                     "staged_samples_per_s": samples / statistics.median(times["staged"]),
                     "ratio": {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}, "times_s": times}
        say(f"[data path, {kind}] loop {out[kind]['loop_samples_per_s']:.1f} samples/s, staged "
            f"{out[kind]['staged_samples_per_s']:.1f} samples/s: ratio {out[kind]['ratio']['median']:.3f} "
            f"({q[0]:.3f}-{q[2]:.3f}), {data.num_workers} workers")
        del data, task, staged
    return out


def markdown(res: dict) -> str:
    L = [f"Data path on {res['device']}: batch {res['batch']} x {res['grad_accum']}, {res['steps_per_round']} steps "
         f"per round, {res['rounds']} rounds, amp {res['amp']}.", "",
         "| image features | workers | train() loop | pre-staged | loop / pre-staged (middle half) |",
         "|---|---:|---:|---:|---:|"]
    for kind in ("cached", "computed"):
        if kind in res:
            r = res[kind]
            L.append(f"| {kind} | {r['workers']} | {r['loop_samples_per_s']:.1f} samples/s | "
                     f"{r['staged_samples_per_s']:.1f} samples/s | {r['ratio']['median']:.3f} "
                     f"({r['ratio']['q1']:.3f}-{r['ratio']['q3']:.3f}) |")
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 4, 1 step x 2 rounds: checks that it runs")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--device", default="")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="", help="also write the result as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    kw = dict(steps=1, rounds=2, batch=4) if args.quick else dict(steps=args.steps, rounds=args.rounds,
                                                                     batch=args.batch or None)
    res = bench(cfg, args.device or None, workers=args.workers, **kw)
    print("\n" + markdown(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
