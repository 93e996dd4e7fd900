"""What issue 27's scale-out fixes save, counted at the paper's shapes or measured here (bench/scaleout.md).

    .venv/bin/python bench/scaleout.py                 # ~1-2 min on 2 CPU cores; prints the numbers as JSON
    torchrun --standalone --nproc_per_node=2 bench/scaleout.py --barrier    (used by the line above)

Counted, not timed, where the cost only appears on many GPUs: the bytes ITM's negative images move between
processes (item 5) and the bytes the dropout-free query pass keeps
for backward with and without gradient checkpointing (item 9, counted by autograd's saved-tensor hooks). The bytes
DDP broadcasts at start-up (item 6) come from the dry run's parameter counts (bench/scaleout.md). Timed:
the latency of the per-step barrier that train() no longer calls (item 7), 2 gloo processes on this CPU.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GB = 1e9


def itm_negative_bytes(W: int, B: int, N: int, Dv: int, amp_bytes: int = 2) -> dict:
    """Bytes one process receives for ITM's negative images, per micro-batch.
    Before: all_gather of every process's ln_vision output (W*B rows of N x Dv fp32) with gradient, whose backward
    all-reduces a (W, B, N, Dv) fp32 tensor (a ring all-reduce moves 2 (W-1)/W of it per process).
    Now: all_to_all of the B rows this process needs, in the autocast dtype, no backward."""
    row = N * Dv
    before_forward = W * B * row * 4
    before_backward = 2 * (W - 1) / W * W * B * row * 4
    now = B * row * amp_bytes
    return {"shape": f"{W} processes x {B} x {N} x {Dv}", "before_forward_gb": round(before_forward / GB, 3),
            "before_backward_gb": round(before_backward / GB, 3), "now_gb": round(now / GB, 4),
            "ratio_forward": round(before_forward / now, 1)}


def dropout_free_pass_saved_bytes(batch: int = 32, tokens: int = 257) -> dict:
    """Bytes autograd keeps for backward in stage 1's dropout-free query pass at gpu24's Q-Former shapes (bert-base,
    32 queries, image tokens of width 1408), fp32, checkpointing off and on (on: what the old code kept, since the
    pass ran in eval mode and checkpointing was on in training mode only). Counted on the meta device: no memory."""
    from minblip2.config import Stage1Config, gpu24
    from minblip2.stage1 import Stage1Model
    from minblip2.tools.diagnostics import saved_for_backward_bytes

    out = {}
    for ckpt in (False, True):
        q = gpu24().qformer
        q.gradient_checkpointing = ckpt
        with torch.device("meta"):
            model = Stage1Model(q, Stage1Config(query_sim_weight=1.0)).train()
            img = model.ln_vision(torch.randn(batch, tokens, q.vision_width))
            image_kv = [None if kv is None else tuple(x.detach() for x in kv) for kv in model.qformer.image_kv(img)]
        kept = saved_for_backward_bytes(lambda: model._queries_without_dropout(image_kv=image_kv))
        out[f"checkpointing_{'on' if ckpt else 'off'}_gb"] = round(kept / GB, 3)
    out["shape"] = f"micro-batch {batch}, {tokens} image tokens, gpu24's Q-Former (fp32)"
    return out


def barrier_latency(n: int = 300) -> None:
    """Under torchrun: the mean time of one dist.barrier() (gloo), written by rank 0 to stdout as JSON."""
    from minblip2 import dist

    dist.setup("cpu")
    for _ in range(20):
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        dist.barrier()
    us = (time.perf_counter() - t0) / n * 1e6
    if dist.is_master():
        print(json.dumps({"barrier_us_gloo_2_processes": round(us, 1)}))
    dist.cleanup()


def main():
    if "--barrier" in sys.argv:
        return barrier_latency()
    torch.set_num_threads(1)
    res = {"itm_negatives_paper": itm_negative_bytes(8, 105, 257, 1408),
           "dropout_free_pass_gpu24": dropout_free_pass_saved_bytes()}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", __file__, "--barrier"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                       "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    res["barrier"] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else p.stderr[-500:]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
