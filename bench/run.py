"""Every minblip2 benchmark, in ONE process:  .venv/bin/python bench/run.py [--quick]

    1. stage-1 step (ITC+ITM, fwd+bwd+AdamW): minblip2 vs a reference on transformers' Blip2QFormerModel
       (vs_transformers.py)
    2. the speed-ups, one at a time: ITG reusing the queries' keys/values, fused attention (SDPA), bf16
       autocast, fused AdamW, cached image features (speedups.py)
    3. the cost of a stage-1 and a stage-2 step as batch size and number of queries grow, with achieved
       FLOP/s as a fraction of this machine's matmul FLOP/s measured in the same rounds (scaling.py)
    4. stage 2: the frozen LLM stored in bf16 vs fp32 (training step and captioning), and captioning speed,
       greedy vs beam search (stage2.py)
    5. the data path: train()'s DataLoader loop vs the same steps on pre-staged batches, cached and computed
       image features (bench/data_path.py, also runnable alone and callable from scripts/gpu_check.py)

Writes bench/results.json and bench/results.md (--quick: results-quick.*, so a smoke test never overwrites
real numbers; tables: report.py). bench/README.md explains how to read them. Shared helpers: common.py.

How it times (a shared, noisy CPU can change speed 3x within seconds): the variants of a comparison run in
turns -- A B, B A, A B, ... -- in the same process, warmup rounds are thrown away, and every ratio is the
MEDIAN over rounds of the ratio within a round, so a slow patch of the machine hits both sides of it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the benchmark modules live beside this file

import transformers  # noqa: E402

import data_path  # noqa: E402
from common import T0, section  # noqa: E402
from minblip2.config import cpu as cpu_preset  # noqa: E402
from report import markdown  # noqa: E402
from scaling import bench_scaling  # noqa: E402
from speedups import bench_wins  # noqa: E402
from stage2 import bench_stage2  # noqa: E402
from vs_transformers import bench_vs_transformers  # noqa: E402

# Sizes and repeat counts. FULL: the cpu preset's sizes; rounds chosen so the whole run takes ~7-8 minutes on 2
# quiet CPU cores (a stage-1 step at batch 32 takes ~4.4 s on ONE core, ~2.5 s on two). QUICK: tiny, only checks
# that everything runs. More rounds = tighter brackets: raise them if you have the time.
FULL = dict(batch=32, warmup=1, rounds=12, fp32_rounds=4, win_rounds=5, scale_rounds=4, s1_batches=(8, 16, 32),
            s1_queries=(8, 16, 32), s2_batches=(4, 8, 16), s2_queries=(8, 16, 32), gen_batch=8, gen_tokens=20,
            gen_rounds=4, matmul_n=2048)
QUICK = dict(batch=4, warmup=1, rounds=2, fp32_rounds=2, win_rounds=2, scale_rounds=2, s1_batches=(2, 4),
             s1_queries=(8, 16), s2_batches=(2, 4), s2_queries=(8, 16), gen_batch=2, gen_tokens=4, gen_rounds=2,
             matmul_n=1024)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few rounds: checks that everything runs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: torch's choice, one per core). If other jobs keep cores busy, set "
                        "this to the number of FREE cores: oversubscribed threads wait on each other and a step "
                        "can take 10x longer")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    S = argparse.Namespace(**(QUICK if args.quick else FULL))
    cfg = cpu_preset()  # Q-Former h384 x 6 layers, 12 heads, 16 queries; DINOv2 ViT-S/14 tokens (257 x 384)
    res = {"meta": {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick, "device": str(device),
        "cpu": _cpu_name(), "threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "tcmalloc": "tcmalloc" in os.environ.get("LD_PRELOAD", ""), "sizes": vars(S)}}

    bench_vs_transformers(cfg, S, device, res)
    bench_wins(cfg, S, device, res)
    stage2 = bench_scaling(cfg, S, device, res)
    bench_stage2(cfg, S, device, res, stage2)
    section("5 data path: train()'s DataLoader loop vs the same steps on pre-staged batches (bench/data_path.py)")
    res["data_path"] = data_path.bench(cpu_preset(), device, batch=S.batch, steps=1 if args.quick else 2,
                                       rounds=S.rounds // 2 or 1)

    res["meta"]["wall_s"] = time.time() - T0
    stem = "results-quick" if args.quick else "results"
    (BENCH / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res) + "\n\n## 5. Data path\n\n" + data_path.markdown(res["data_path"])
    (BENCH / f"{stem}.md").write_text(md + "\n")
    print("\n" + md)
    print(f"\nwrote {BENCH / stem}.json and .md in {res['meta']['wall_s']:.0f} s")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
