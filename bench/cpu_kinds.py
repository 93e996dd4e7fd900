"""The two kinds of CPU learners bring, measured on one machine:  .venv/bin/python bench/cpu_kinds.py

Most laptops and many servers have no AMX (Intel Core, AMD Ryzen/EPYC, Apple silicon): there bf16 matrix products
are no faster than fp32, often slower, and the cpu preset's `amp="auto"` / `llm.dtype="auto"` pick fp32. CPUs with
AMX (Xeon Sapphire Rapids and later) multiply bf16 matrices several times faster, and "auto" picks bf16.

On a CPU with AMX this script measures both kinds. It runs itself twice, each time in a fresh process:
  - "as is": the CPU as it is;
  - "no AMX": oneDNN limited to AVX512_CORE_BF16 (ONEDNN_MAX_CPU_ISA), i.e. AVX-512 with bf16 instructions but no
    AMX tiles. oneDNN reads the variable once, when torch loads it, hence the fresh process; the bf16 matmul rate
    shows whether the limit took effect (it is printed, and the run stops if bf16 did not slow down).
Each process measures, alternating the variants within rounds (bench/README.md: ratios of medians, noisy-CPU-proof):
  1. 2048x2048 matmul rate, fp32 and bf16, and what precision "auto" picks there (runtime.cpu_matmul_rates);
  2. a stage-1 step (ITC+ITM, fwd+bwd+AdamW) at the cpu preset's sizes, minblip2 against transformers'
     Blip2QFormerModel, under bf16 autocast and in fp32 (bench/vs_transformers.py);
  3. a stage-2 step in the two settings "auto" chooses between: LLM stored in bf16 + bf16 autocast, against LLM in
     fp32 with no autocast.
Writes bench/cpu-kinds.json and bench/cpu-kinds.md. About 10 minutes on 2 quiet cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
KINDS = {"as is": {}, "no AMX (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}}


def measure(rounds: int, fp32_rounds: int, batch: int) -> dict:
    """Everything one kind of CPU is measured for, in this process."""
    import torch

    sys.path.insert(0, str(BENCH))
    from common import alternate, captions, image_tokens, paired_ratio, spread, stage2_model, stage2_step
    from vs_transformers import bench_vs_transformers

    from minblip2 import runtime
    from minblip2.config import cpu as cpu_preset

    device = torch.device("cpu")
    out = {"threads": torch.get_num_threads(), "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA", "none")}
    n = 2048
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    t = alternate("2048x2048 matmul", {"fp32": lambda: a32 @ b32, "bf16": lambda: a16 @ b16}, 1, 5, device)
    out["matmul_gflops"] = {k: 2 * n**3 / spread(v)["median"] / 1e9 for k, v in t.items()}
    out["auto"] = {"amp": runtime.resolve_amp("auto", device), "llm_dtype": runtime.resolve_dtype("auto", device)}

    cfg = cpu_preset()
    S = argparse.Namespace(batch=batch, warmup=1, rounds=rounds, fp32_rounds=fp32_rounds)
    res = {}
    bench_vs_transformers(cfg, S, device, res)
    out["stage1_vs_transformers"] = {name: {"s_per_step": r["seconds"], "speed_ratio": r["speed_ratio"],
                                            "speed_ratio_attn_math": r["speed_ratio_attn_math"]}
                                     for name, r in res["vs_transformers"].items() if isinstance(r, dict)
                                     and "speed_ratio" in r}

    c16, c32 = copy.deepcopy(cfg), copy.deepcopy(cfg)
    c16.llm.dtype, c32.llm.dtype = "bfloat16", "float32"
    m16, opt16 = stage2_model(c16, device, cfg.qformer.num_queries)
    m32, opt32 = stage2_model(c32, device, cfg.qformer.num_queries, share_llm_of=None)
    m16.load_trainable_state_dict(m32.trainable_state_dict())  # the same Q-Former weights
    B2 = 16
    img, caps = image_tokens(B2, cfg.qformer.vision_width, device), captions(B2)
    t = alternate("stage-2 step", {"bf16 (LLM bf16, autocast)": lambda: stage2_step(m16, opt16, img, caps, device, True),
                                   "fp32 (LLM fp32, no autocast)": lambda: stage2_step(m32, opt32, img, caps, device, False)},
                  1, fp32_rounds, device)
    out["stage2_step"] = {"batch": B2, "s_per_step": {k: spread(v) for k, v in t.items()},
                          "fp32_speedup": paired_ratio(t["bf16 (LLM bf16, autocast)"], t["fp32 (LLM fp32, no autocast)"])}
    return out


def markdown(doc: dict) -> str:
    lines = ["# Two kinds of CPU: with AMX, and without (emulated)", "",
             f"{doc['date']} | {doc['cpu']} | {doc['threads']} threads | torch {doc['torch']} | "
             f"written by `bench/cpu_kinds.py` ({doc['wall_s']:.0f} s)", "",
             "Ratios are medians of within-round ratios (middle half in brackets). \"no AMX\" is this CPU with "
             "oneDNN limited to AVX512_CORE_BF16: AVX-512 and its bf16 instructions, no AMX tiles. CPUs without "
             "AVX-512 (most laptops, AMD before Zen 4) are slower still in bf16.", "",
             "| | " + " | ".join(doc["kinds"]) + " |", "|---|" + "---:|" * len(doc["kinds"])]
    k = list(doc["kinds"].values())
    def row(name, fn):
        lines.append(f"| {name} | " + " | ".join(fn(r) for r in k) + " |")
    fmt = lambda r: f"**{r['median']:.2f}** ({r['q1']:.2f}-{r['q3']:.2f})"
    row("2048x2048 matmul, fp32 (GFLOP/s)", lambda r: f"{r['matmul_gflops']['fp32']:.0f}")
    row("2048x2048 matmul, bf16 (GFLOP/s)", lambda r: f"{r['matmul_gflops']['bf16']:.0f}")
    row("precision \"auto\" picks", lambda r: f"amp {r['auto']['amp']}, LLM {r['auto']['llm_dtype'].replace('torch.', '')}")
    for prec in ("bf16 autocast", "fp32"):
        row(f"stage-1 step, {prec}: minblip2 s/step", lambda r: f"{r['stage1_vs_transformers'][prec]['s_per_step']['minblip2']['median']:.2f}")
        row(f"stage-1 step, {prec}: transformers s/step", lambda r: f"{r['stage1_vs_transformers'][prec]['s_per_step']['transformers']['median']:.2f}")
        row(f"stage-1 step, {prec}: **speed ratio** minblip2 / transformers", lambda r: fmt(r["stage1_vs_transformers"][prec]["speed_ratio"]))
        row(f"the same, minblip2 with attn_impl=math", lambda r: fmt(r["stage1_vs_transformers"][prec]["speed_ratio_attn_math"]))
    row("stage-2 step, LLM bf16 + autocast (s)", lambda r: f"{r['stage2_step']['s_per_step']['bf16 (LLM bf16, autocast)']['median']:.2f}")
    row("stage-2 step, LLM fp32, no autocast (s)", lambda r: f"{r['stage2_step']['s_per_step']['fp32 (LLM fp32, no autocast)']['median']:.2f}")
    row("stage-2: fp32 speed / bf16 speed", lambda r: fmt(r["stage2_step"]["fp32_speedup"]))
    lines += ["", "Stage-1 step: ITC+ITM with hard negatives, fwd + bwd + clip + AdamW, batch 32, 16 queries (bench/"
              "vs_transformers.py; speed ratio > 1: minblip2 is faster). Stage-2 step: batch 16, SmolLM2-135M frozen."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds of the bf16 stage-1 comparison")
    p.add_argument("--fp32-rounds", type=int, default=4, help="timed rounds of the fp32 and stage-2 comparisons")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one kind of CPU: print the measurements as the last line
        print(json.dumps(measure(args.rounds, args.fp32_rounds, args.batch)))
        return
    import platform

    import torch
    t0 = time.time()
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": _cpu_name(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "kinds": {}}
    for kind, env in KINDS.items():
        print(f"== {kind}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--fp32-rounds",
                               str(args.fp32_rounds), "--batch", str(args.batch)],
                              env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{kind}: the measuring process failed:\n{proc.stderr[-3000:]}")
        doc["kinds"][kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(proc.stdout.strip().splitlines()[-1][:300], flush=True)
    rates = [r["matmul_gflops"]["bf16"] for r in doc["kinds"].values()]
    if len(rates) == 2 and rates[1] > 0.5 * rates[0]:
        print(f"warning: with ONEDNN_MAX_CPU_ISA the bf16 matmul ran at {rates[1]:.0f} vs {rates[0]:.0f} GFLOP/s: "
              "this CPU has no AMX to switch off, or the limit did not take effect; both columns show the same kind")
    doc["wall_s"] = time.time() - t0
    (BENCH / "cpu-kinds.json").write_text(json.dumps(doc, indent=1))
    (BENCH / "cpu-kinds.md").write_text(markdown(doc))
    print(markdown(doc))


def _cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
