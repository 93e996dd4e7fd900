"""4. Stage 2: the frozen LLM stored in bf16 vs fp32 (a training step and captioning), and captioning speed,
greedy vs beam search.
"""
from __future__ import annotations

import copy
import statistics

import torch

from common import alternate, autocast, captions, image_tokens, paired_ratio, section, spread, stage2_model, stage2_step
from minblip2.train import build_optimizer


def bench_stage2(cfg, S, device, res, preset_model=None):
    section("4/4 stage 2: frozen LLM in bf16, and captioning greedy vs beam search")
    # Under bf16 autocast, autocast caches its bf16 copies only of weights that require grad, so a FROZEN fp32 LLM
    # is cast again at every forward -- every generated token. Compare an fp32-stored LLM with a bf16-stored one
    # (the cpu preset's llm.dtype), whatever the preset says.
    def with_llm_dtype(dtype: str):  # section 3's preset model when its LLM is stored that way, else a new one
        if preset_model is not None and next(preset_model.llm.parameters()).dtype == getattr(torch, dtype):
            return preset_model, build_optimizer(preset_model, cfg.stage2)
        c = copy.deepcopy(cfg)
        c.llm.dtype = dtype
        return stage2_model(c, device, cfg.qformer.num_queries)

    model16, opt16 = with_llm_dtype("bfloat16")
    model, opt = with_llm_dtype("float32")
    model16.load_trainable_state_dict(model.trainable_state_dict())  # the same Q-Former weights

    B = max(S.s2_batches)
    img, caps = image_tokens(B, cfg.qformer.vision_width, device), captions(B)
    t = alternate("stage-2 step, LLM dtype", {"LLM bf16": lambda: stage2_step(model16, opt16, img, caps, device),
                                              "LLM fp32": lambda: stage2_step(model, opt, img, caps, device)},
                  S.warmup, S.win_rounds, device)
    step = {"batch": B, "seconds": {k: spread(v) for k, v in t.items()},
            "speedup_bf16_llm": paired_ratio(t["LLM fp32"], t["LLM bf16"])}

    model.eval()
    model16.eval()
    G, n, beams = S.gen_batch, S.gen_tokens, cfg.eval.num_beams
    img = image_tokens(G, cfg.qformer.vision_width, device)

    def gen(m, num_beams):  # tools/coco_mini.py's captioning call; min = max: every variant writes equal lengths
        with autocast(device, True):
            m.generate(img, num_beams=num_beams, max_new_tokens=n, min_new_tokens=n)
    variants = {f"{name}, LLM {dt}": (lambda m=m, k=k: gen(m, k))
                for dt, m in (("fp32", model), ("bf16", model16)) for name, k in (("greedy", 1), (f"beam {beams}", beams))}
    t = alternate("generation", variants, S.warmup, S.gen_rounds, device)
    res["stage2"] = {
        "llm": cfg.llm.name, "num_queries": model.qcfg.num_queries, "step": step,
        "generation": {
            "batch": G, "new_tokens": n, "num_beams": beams,
            "seconds": {k: spread(v) for k, v in t.items()},
            "captions_per_s": {k: G / statistics.median(v) for k, v in t.items()},
            "tokens_per_s": {k: G * n / statistics.median(v) for k, v in t.items()},
            "greedy_speedup_over_beam": {dt: paired_ratio(t[f"beam {beams}, LLM {dt}"], t[f"greedy, LLM {dt}"])
                                         for dt in ("fp32", "bf16")},
            "bf16_llm_speedup": {d: paired_ratio(t[f"{d}, LLM fp32"], t[f"{d}, LLM bf16"])
                                 for d in ("greedy", f"beam {beams}")},
        }}

