"""A refactor's proof: the exact losses and weights of a short stage-1 and stage-2 run on coco-mini.

    .venv/bin/python scripts/loss_fingerprint.py > before.txt
    (change the code)
    .venv/bin/python scripts/loss_fingerprint.py > after.txt && diff before.txt after.txt   # no output = same

The cpu preset, 3 steps of stage 1 (ITC + ITM + ITG) and 3 of stage 2 from it, one thread (run-to-run
identical on one machine). Prints every logged loss to full precision and a SHA-256 of each stage's trained
weights (bit for bit). ~2 min.
"""
import csv
import hashlib
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from minblip2 import config
from minblip2.train import train
from minblip2.checkpoint import latest_checkpoint


def weights_hash(run_dir: Path) -> str:
    state = load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].float().numpy().tobytes())
    return h.hexdigest()[:16]


def main():
    torch.set_num_threads(1)
    cfg = config.cpu()
    for t in (cfg.stage1, cfg.stage2):
        t.max_steps, t.log_every, t.warmup_steps = 3, 1, 2
    with tempfile.TemporaryDirectory() as d:
        cfg.out_dir = d
        for stage in (1, 2):
            run_dir = train(cfg, stage, progress=False)
            with open(run_dir / "log.csv") as f:
                for row in csv.DictReader(f):
                    print(f"stage {stage} step {row['step']}:",
                          {k: v for k, v in row.items() if k.startswith("loss") or k == "grad_norm"})
            print(f"stage {stage} weights sha256:", weights_hash(run_dir))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
