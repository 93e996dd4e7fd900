"""3. The cost of a stage-1 and a stage-2 step as batch size and number of queries grow: s/step, samples/s,
FLOPs per step (FlopCounterMode) and the achieved FLOP/s as a fraction of a big bf16 matmul's FLOP/s measured in
the same rounds; and where a stage-1 forward pass's FLOPs go.
"""
from __future__ import annotations

import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from common import (alternate, autocast, caption_tokens, captions, image_tokens, paired_ratio, section, spread,
                    stage1_model, stage1_step, stage2_model, stage2_step)

# ----------------------------------------------------------------------------- FLOPs


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kw):
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kw):
    return sdpa_backward_flop_count(grad_out, q, k, v)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one: count it with the same formula
CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}


def count_flops(fn) -> tuple[int, dict]:
    """FLOPs of one call of fn (matmuls and attention, forward and backward; 2 FLOPs per multiply-add)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as fc:
        fn()
    return fc.get_total_flops(), fc.get_flop_counts()


def flop_breakdown(counts: dict) -> dict[str, int]:
    """Where a stage-1 FORWARD pass's FLOPs go, from FlopCounterMode's per-module counts (parents include
    children). Forward only: the counter's per-module attribution of backward ops is unreliable (its totals
    are right); each linear's backward costs twice its forward, so the step splits about the same way."""
    linear = (torch.ops.aten.mm, torch.ops.aten.addmm)

    def total(suffixes, ops=None):
        return sum(f for mod, per_op in counts.items() if mod.endswith(suffixes)
                   for op, f in per_op.items() if ops is None or ops(op))

    everything = sum(counts["Global"].values())
    parts = {
        "cross-attention key/value projections of the image tokens": total((".cross_attn.key", ".cross_attn.value")),
        "attention itself (QK^T, softmax(.)V)": total(("self_attn", "cross_attn"), lambda op: op not in linear),
        "ITG lm_head (vocabulary projection)": total((".lm_head",)),
    }
    parts["everything else (projections, FFNs, ITC)"] = everything - sum(parts.values())
    return parts


def matmul_fn(n: int, dtype, device, repeat: int = 3):
    """A big square matmul (repeated) and its FLOPs: what this machine can do at best in that dtype."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def fn():
        for _ in range(repeat):
            a @ b
    return fn, 2 * n ** 3 * repeat


# ----------------------------------------------------------------------------- 3. scaling


def scaling_table(label, configs: dict, S, device) -> dict:
    """Round-robin over every config AND two big matmuls, so each step's FLOP/s is compared with the matmul
    FLOP/s of the same round (the fraction cancels the machine's drift like any paired ratio)."""
    mm = {"matmul bf16": matmul_fn(S.matmul_n, torch.bfloat16, device),
          "matmul fp32": matmul_fn(S.matmul_n, torch.float32, device)}
    variants = {n: c["fn"] for n, c in configs.items()} | {n: fn for n, (fn, _) in mm.items()}
    t = alternate(label, variants, S.warmup, S.scale_rounds, device)
    peak = {n: spread([f / s for s in t[n]]) for n, (_, f) in mm.items()}
    rows = []
    for n, c in configs.items():
        flops = c["flops"]
        rows.append({"name": n, "batch": c["batch"], "num_queries": c["num_queries"], "seconds": spread(t[n]),
                     "samples_per_s": c["batch"] / statistics.median(t[n]), "flops_per_step": flops,
                     "achieved_flops_per_s": flops / statistics.median(t[n]),
                     # per round: (step FLOP/s) / (bf16 matmul FLOP/s), the step's matmuls run in bf16 (autocast)
                     "fraction_of_bf16_matmul": paired_ratio(
                         [flops / s for s in t[n]], [mm["matmul bf16"][1] / s for s in t["matmul bf16"]])})
    return {"matmul_flops_per_s": peak, "matmul_n": S.matmul_n, "rows": rows}


def grid(batches, queries, base_batch, base_queries):
    """(batch, queries) pairs: batch grows at the preset's queries, queries grow at the base batch."""
    return list(dict.fromkeys([(b, base_queries) for b in batches] + [(base_batch, q) for q in queries]))


def bench_scaling(cfg, S, device, res):
    section("3/4 scaling with batch size and number of queries")
    Q0 = cfg.qformer.num_queries  # the preset's 16
    configs, models = {}, {}
    for b, q in grid(S.s1_batches, S.s1_queries, max(S.s1_batches), Q0):
        if q not in models:
            models[q] = stage1_model(cfg, device, num_queries=q)
        model, opt = models[q]
        batch = (image_tokens(b, cfg.qformer.vision_width, device), *caption_tokens(b, device))
        fn = (lambda m=model, o=opt, x=batch: stage1_step(m, o, x, device))
        configs[f"stage-1 B={b} Q={q}"] = {"fn": fn, "batch": b, "num_queries": q, "flops": count_flops(fn)[0]}
    b, (model, _) = max(S.s1_batches), models[Q0]
    with autocast(device, True):
        fwd_flops, counts = count_flops(lambda: model(image_tokens(b, cfg.qformer.vision_width, device),
                                                      *caption_tokens(b, device)))
    res["stage1_flop_breakdown"] = {"batch": b, "num_queries": Q0, "flops": flop_breakdown(counts),
                                    "total": fwd_flops}
    res["scaling_stage1"] = scaling_table("scaling, stage 1", configs, S, device)
    del configs, models

    configs, models = {}, {}
    for b, q in grid(S.s2_batches, S.s2_queries, max(S.s2_batches), Q0):
        if q not in models:
            models[q] = stage2_model(cfg, device, q, share_llm_of=next(iter(models.values()))[0] if models else None)
        model, opt = models[q]
        img, caps = image_tokens(b, cfg.qformer.vision_width, device), captions(b)
        fn = (lambda m=model, o=opt, x=img, c=caps: stage2_step(m, o, x, c, device))
        configs[f"stage-2 B={b} Q={q}"] = {"fn": fn, "batch": b, "num_queries": q, "flops": count_flops(fn)[0]}
    res["scaling_stage2"] = scaling_table("scaling, stage 2", configs, S, device)
    res["scaling_stage2"]["llm"] = cfg.llm.name
    return models.get(Q0, (None,))[0]  # the preset's stage-2 model, for section 4

