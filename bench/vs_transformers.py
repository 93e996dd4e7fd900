"""1. A stage-1 step (ITC+ITM, fwd+bwd+AdamW): minblip2 vs a reference on transformers' Blip2QFormerModel.

Same config, the SAME weights, the same losses and hard-negative draws (bench/hf_reference.py); they must agree
in fp32 before anything is timed. Samples/s, the speed ratio and peak step memory, in bf16 autocast and fp32,
plus minblip2 with attn_impl="math".
"""
from __future__ import annotations

import statistics

import torch

from common import (alternate, attention, caption_tokens, image_tokens, paired_ratio, peak_step_memory, section,
                    spread, stage1_model, stage1_step)
from hf_reference import HFStage1Reference
from minblip2.train import build_optimizer


def bench_vs_transformers(cfg, S, device, res):
    section("1/4 stage-1 step (ITC+ITM): minblip2 vs transformers' Blip2QFormerModel")
    ours, opt_ours = stage1_model(cfg, device, losses=("itc", "itm"))
    ref = HFStage1Reference.from_minblip2(ours).to(device).train()
    opt_ref = build_optimizer(ref, ours.scfg)

    # same weights, same inputs, same hard-negative draws -> the same losses, or the comparison is not fair
    ours.eval()
    ref.eval()
    small = (image_tokens(4, cfg.qformer.vision_width, device, 1), *caption_tokens(4, device, 1))
    with torch.no_grad():
        a = ours(*small, generator=torch.Generator(device=device).manual_seed(3))
        b = ref(*small, generator=torch.Generator(device=device).manual_seed(3))
    parity = max(abs(float(a[k]) - float(b[k])) for k in ("loss_itc", "loss_itm"))
    assert parity < 1e-4, f"the reference does not compute what minblip2 computes (loss difference {parity})"
    ours.train()
    ref.train()

    B = S.batch
    batch = (image_tokens(B, cfg.qformer.vision_width, device), *caption_tokens(B, device))
    g1, g2, g3 = (torch.Generator(device=device).manual_seed(0) for _ in range(3))

    def ours_math(bf16):  # the same model with QFormerConfig.attn_impl="math" (written-out attention)
        with attention("manual", ours):
            stage1_step(ours, opt_ours, batch, device, bf16, g3)
    out = {"batch": B, "num_queries": cfg.qformer.num_queries, "text_len": batch[1].shape[1],
           "loss_parity_fp32": parity, "attn_implementation_transformers": ref.qformer.config._attn_implementation}
    for bf16 in (True, False):
        name = "bf16 autocast" if bf16 else "fp32"
        variants = {"minblip2": lambda: stage1_step(ours, opt_ours, batch, device, bf16, g1),
                    "transformers": lambda: stage1_step(ref, opt_ref, batch, device, bf16, g2),
                    "minblip2, attn_impl=math": lambda: ours_math(bf16)}
        t = alternate(f"vs transformers, {name}", variants, S.warmup, S.rounds if bf16 else S.fp32_rounds, device)
        mem = {n: peak_step_memory(fn, device) for n, fn in variants.items()}
        out[name] = {
            "seconds": {n: spread(v) for n, v in t.items()},
            "samples_per_s": {n: B / statistics.median(v) for n, v in t.items()},
            "speed_ratio": paired_ratio(t["transformers"], t["minblip2"]),  # > 1: minblip2 is faster
            "speed_ratio_attn_math": paired_ratio(t["transformers"], t["minblip2, attn_impl=math"]),
            "peak_step_memory_bytes": mem,
            "memory_ratio": mem["minblip2"] / mem["transformers"] if None not in mem.values() else None,
        }
        r = out[name]["speed_ratio"]
        print(f"  {name}: minblip2 speed / transformers speed = {r['median']:.3f} (middle half {r['q1']:.3f}-{r['q3']:.3f})")
    res["vs_transformers"] = out


# ----------------------------------------------------------------------------- 2. each speed-up on its own
