"""Every minblip2 benchmark, in ONE process:  .venv/bin/python bench/run.py [--quick]

    1. stage-1 step (ITC+ITM, fwd+bwd+AdamW): minblip2 vs a reference on transformers' Blip2QFormerModel
    2. the speed-ups, one at a time: ITG reusing the queries' keys/values, fused attention (SDPA), bf16
       autocast, fused AdamW, cached image features
    3. the cost of a stage-1 and a stage-2 step as batch size and number of queries grow, with achieved
       FLOP/s as a fraction of this machine's matmul FLOP/s measured in the same rounds
    4. stage 2: the frozen LLM stored in bf16 vs fp32 (training step and captioning), and captioning speed,
       greedy vs beam search
    5. the data path: train()'s DataLoader loop vs the same steps on pre-staged batches, cached and computed
       image features (bench/data_path.py, also runnable alone and callable from scripts/gpu_check.py)

Writes bench/results.json and bench/results.md (--quick: results-quick.*, so a smoke test never overwrites
real numbers). bench/README.md explains how to read them.

How it times (a shared, noisy CPU can change speed 3x within seconds): the variants of a comparison run in
turns -- A B, B A, A B, ... -- in the same process, warmup rounds are thrown away, and every ratio is the
MEDIAN over rounds of the ratio within a round, so a slow patch of the machine hits both sides of it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # hf_reference.py lives beside this file

import transformers  # noqa: E402

import data_path  # noqa: E402
from hf_reference import HFStage1Reference  # noqa: E402
from minblip2.backbones import load_image_encoder  # noqa: E402
from minblip2.config import cpu as cpu_preset  # noqa: E402
from minblip2.qformer import Attention  # noqa: E402
from minblip2.stage1 import Stage1Model  # noqa: E402
from minblip2.stage2 import Stage2Model  # noqa: E402
from minblip2.tasks import build_stage2_model  # noqa: E402
from minblip2.train import build_optimizer  # noqa: E402

NUM_IMAGE_TOKENS = 257  # DINOv2 ViT-S/14 at 224 px: 16 x 16 patches + [CLS]

# Sizes and repeat counts. FULL: the cpu preset's sizes; rounds chosen so the whole run takes ~7-8 minutes on 2
# quiet CPU cores (a stage-1 step at batch 32 takes ~4.4 s on ONE core, ~2.5 s on two). QUICK: tiny, only checks
# that everything runs. More rounds = tighter brackets: raise them if you have the time.
FULL = dict(batch=32, warmup=1, rounds=12, fp32_rounds=4, win_rounds=5, scale_rounds=4, s1_batches=(8, 16, 32),
            s1_queries=(8, 16, 32), s2_batches=(4, 8, 16), s2_queries=(8, 16, 32), gen_batch=8, gen_tokens=20,
            gen_rounds=4, matmul_n=2048)
QUICK = dict(batch=4, warmup=1, rounds=2, fp32_rounds=2, win_rounds=2, scale_rounds=2, s1_batches=(2, 4),
             s1_queries=(8, 16), s2_batches=(2, 4), s2_queries=(8, 16), gen_batch=2, gen_tokens=4, gen_rounds=2,
             matmul_n=1024)
T0 = time.time()


def section(title: str):
    print(f"\n[{time.time() - T0:4.0f} s] {title}", flush=True)


# ----------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(label: str, variants: dict, warmup: int, rounds: int, device) -> dict[str, list[float]]:
    """Seconds per call of each variant, run in turns; the order rotates every round so none always goes first."""
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        took = {}
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            variants[n]()
            sync(device)
            took[n] = time.perf_counter() - t0
        tag = "warmup" if r < warmup else f"round {r - warmup + 1}/{rounds}"
        print(f"  [{label}] {tag}: " + "  ".join(f"{n} {took[n]:.2f}s" for n in names), flush=True)
        if r >= warmup:
            for n in names:
                times[n].append(took[n])
    return times


def spread(xs: list[float]) -> dict:
    """Median and quartiles (the middle half of the rounds lies between q1 and q3)."""
    if len(xs) < 2:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0], "n": len(xs)}
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "n": len(xs)}


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Spread of num[i] / den[i]: both measured in the same round, so machine drift cancels in each ratio."""
    return spread([a / b for a, b in zip(num, den)])


# ----------------------------------------------------------------------------- memory and FLOPs


def peak_step_memory(fn, device) -> int | None:
    """Peak bytes of tensor memory allocated during one call of fn, above what was already live before it.

    Weights and optimizer state exist before a step, so this is the step's working memory: activations,
    gradients, temporaries. CUDA: the caching allocator's max_memory_allocated. CPU has no allocator
    statistics, so the profiler records every allocation with the running total of bytes allocated (and not
    yet freed) since it started; we take that total's maximum. It counts tensor storage, not the process RSS.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        from torch._C._profiler import _EventType
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        stack, peak = list(prof.profiler.kineto_results.experimental_event_tree()), 0
        while stack:  # walk the whole event tree: allocations hang under the ops that made them
            e = stack.pop()
            stack.extend(e.children)
            if e.tag == _EventType.Allocation:
                peak = max(peak, e.extra_fields.total_allocated)
        return peak
    except (ImportError, AttributeError) as e:  # private profiler API: may move between torch versions
        print(f"  (peak memory unavailable: {e})")
        return None


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


# ----------------------------------------------------------------------------- inputs and steps


def image_tokens(B: int, width: int, device, seed: int = 0):
    """Random frozen-encoder tokens of the real shape: the Q-Former's cost does not depend on their values."""
    return torch.randn(B, NUM_IMAGE_TOKENS, width, generator=torch.Generator().manual_seed(seed)).to(device)


def caption_tokens(B: int, device, seed: int = 0):
    """Random BERT ids shaped like COCO captions: [CLS] ... [SEP], 11-24 tokens, padded to the batch's longest."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(11, 25, (B,), generator=g)
    T = int(lengths.max())
    ids = torch.randint(1000, 30000, (B, T), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(B), lengths - 1] = 102  # [SEP]
    ids[mask == 0] = 0  # [PAD]
    return ids.to(device), mask.to(device)


WORDS = "a man woman dog cat sitting on the table with red blue small large bus street plate of food near".split()


def captions(B: int, seed: int = 0) -> list[str]:
    """Caption-like strings of 8-13 words (stage 2 tokenizes them itself, as in training)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(B):
        n = int(torch.randint(8, 14, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    return out


def autocast(device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def stage1_step(model, opt, batch, device, bf16=True, generator=None):
    """One training step as train.py runs it: autocast forward, backward, clip, AdamW, zero the gradients."""
    img, ids, mask = batch
    with autocast(device, bf16):
        loss = model(img, ids, mask, generator=generator)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def stage2_step(model, opt, img, caps, device, bf16=True):
    with autocast(device, bf16):
        loss = model(img, caps)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def stage1_model(cfg, device, losses=("itc", "itm", "itg"), num_queries=None):
    """A Stage1Model at the preset's sizes, randomly initialised (weights do not change the cost), + AdamW."""
    qcfg = dataclasses.replace(cfg.qformer, num_queries=num_queries or cfg.qformer.num_queries)
    scfg = dataclasses.replace(cfg.stage1, losses=tuple(losses))
    torch.manual_seed(0)
    model = Stage1Model(qcfg, scfg).to(device).train()
    return model, build_optimizer(model, scfg)


def stage2_model(cfg, device, num_queries, share_llm_of=None):
    """A Stage2Model with a fresh Q-Former (from_stage1=False: no checkpoint needed, same cost) + AdamW.

    The first one loads the frozen SmolLM2-135M (offline weights) through build_stage2_model; later ones
    share that LLM instead of loading it again."""
    cfg = copy.deepcopy(cfg)
    cfg.qformer.num_queries, cfg.stage2.from_stage1 = num_queries, False
    torch.manual_seed(0)
    if share_llm_of is None:
        model = build_stage2_model(cfg)
    else:
        model = Stage2Model(cfg.qformer, share_llm_of.llm, share_llm_of.tokenizer, prompt=cfg.llm.prompt,
                            max_text_len=cfg.data.max_text_len)
    model = model.to(device).train()
    return model, build_optimizer(model, cfg.stage2)


# ----------------------------------------------------------------------------- attention variants


@contextlib.contextmanager
def attention(kind: str, model):
    """Run `model` with one attention implementation for the duration.

    "sdpa": as shipped (QFormerConfig.attn_impl="sdpa"). "manual": attn_impl="math", the package's written-out
    matmul -> mask -> softmax -> dropout -> matmul. "sdpa, no attention dropout": SDPA with dropout_p forced to 0
    (patched in here). On CPU, SDPA only has a fused kernel WITHOUT dropout; training (dropout 0.1 on the attention
    probabilities, BERT's recipe) falls back to unfused math. This variant shows what dropping that dropout buys.
    """
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    original = F.scaled_dot_product_attention

    def no_attention_dropout(q, k, v, attn_mask=None, dropout_p=0.0, **kw):
        return original(q, k, v, attn_mask=attn_mask, dropout_p=0.0, **kw)

    for m in layers:
        m.impl = "math" if kind == "manual" else "sdpa"
    if kind == "sdpa, no attention dropout":
        F.scaled_dot_product_attention = no_attention_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        for m in layers:
            m.impl = "sdpa"


# ----------------------------------------------------------------------------- 1. minblip2 vs transformers


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


def bench_wins(cfg, S, device, res):
    section("2/4 each speed-up on its own (stage-1 step, ITC+ITM+ITG)")
    model, opt = stage1_model(cfg, device)  # the preset: reuse on, SDPA, bf16, cached features
    B = S.batch
    batch = (image_tokens(B, cfg.qformer.vision_width, device), *caption_tokens(B, device))
    step = lambda bf16=True: stage1_step(model, opt, batch, device, bf16)  # noqa: E731
    wins = []

    def compare(name, baseline, variants, what, memory=True):
        """Time the variants in turns; each one's speed-up = baseline's time / its time, paired by round.
        memory=False skips the (slower, profiled) memory step where the variants cannot differ much."""
        t = alternate(name, variants, S.warmup, S.win_rounds, device)
        mem = {n: peak_step_memory(fn, device) if memory else None for n, fn in variants.items()}
        entry = {"win": name, "baseline": baseline, "what": what,
                 "seconds": {n: spread(v) for n, v in t.items()},
                 "speedup": {n: paired_ratio(t[baseline], t[n]) for n in variants if n != baseline},
                 "peak_step_memory_bytes": mem}
        wins.append(entry)
        for n, r in entry["speedup"].items():
            print(f"  {name}: '{n}' is {r['median']:.3f}x as fast as '{baseline}' "
                  f"(middle half {r['q1']:.3f}-{r['q3']:.3f})")

    def itg(reuse):
        model.scfg.itg_reuse_queries = reuse
        step()
    compare("ITG reuses the queries' keys/values", "recompute",
            {"reuse": lambda: itg(True), "recompute": lambda: itg(False)},
            "Stage1Config.itg_reuse_queries: ITG takes the queries' per-layer K/V from the ITC pass (LAVIS does this) "
            "instead of running the queries and the image cross-attention again")
    model.scfg.itg_reuse_queries = True

    def attn(kind):
        with attention(kind, model):
            step()
    compare("fused attention (SDPA)", "manual",
            {k: (lambda k=k: attn(k)) for k in ("sdpa", "manual", "sdpa, no attention dropout")},
            "F.scaled_dot_product_attention vs the same math written out (--qformer.attn_impl=math); "
            "'sdpa, no attention dropout' forces dropout_p=0, the only case with a fused CPU kernel (a recipe change)")

    model.eval()  # inference (retrieval's ITM re-ranking): no dropout, so SDPA takes its fused kernel on CPU too

    def itm_scores(kind):
        with attention(kind, model), torch.no_grad(), autocast(device, True):
            model.itm_logits(*batch)
    compare("fused attention (SDPA), inference", "manual", {k: (lambda k=k: itm_scores(k)) for k in ("sdpa", "manual")},
            "the ITM forward retrieval re-ranking runs (eval mode, no grad, B image-text pairs): no dropout, so "
            "SDPA runs its fused CPU kernel", memory=False)
    model.train()

    compare("bf16 autocast", "fp32", {"bf16": lambda: step(True), "fp32": lambda: step(False)},
            "torch.autocast(bfloat16) around the forward pass vs plain fp32")

    # train.build_optimizer asks for torch's fused AdamW (CPU and CUDA); the alternative is the default loop.
    unfused = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in opt.param_groups],
                                lr=cfg.stage1.lr, betas=tuple(cfg.stage1.betas), fused=False)
    compare("fused AdamW", "AdamW, not fused",
            {"fused AdamW": lambda: stage1_step(model, opt, batch, device),
             "AdamW, not fused": lambda: stage1_step(model, unfused, batch, device)},
            "what train.build_optimizer builds (torch.optim.AdamW(fused=True)) vs fused=False (foreach/loop); "
            "the step updates 32M parameters, 12M of them the word embeddings (30523 x 384)", memory=False)

    encoder = load_image_encoder(cfg.vision).to(device)  # frozen DINOv2 ViT-S/14 (offline weights)
    pixels = torch.randn(B, 3, cfg.vision.img_size, cfg.vision.img_size, device=device)  # already "normalised"
    bank = torch.randn(4 * B, NUM_IMAGE_TOKENS, cfg.qformer.vision_width).half()  # features.py's cache: fp16, CPU
    _, ids, mask = batch

    def with_encoder():  # train.py without a cache: the frozen encoder runs inside the autocast, no grad
        with torch.no_grad(), autocast(device, True):
            img = encoder(pixels)
        stage1_step(model, opt, (img, ids, mask), device)

    def from_cache():  # ImageTextData.batch with a cache: index the fp16 bank, cast to fp32
        img = bank[torch.randperm(len(bank))[:B]].to(device).float()
        stage1_step(model, opt, (img, ids, mask), device)
    compare("cached image features", "encoder", {"cached": from_cache, "encoder": with_encoder},
            "a Q-Former step reading features from a fp16 cache vs running the frozen encoder on the batch first "
            "(random pixels; the real uncached path also decodes and augments JPEGs, not timed here)", memory=False)
    res["wins"] = {"batch": B, "num_queries": cfg.qformer.num_queries, "text_len": ids.shape[1], "results": wins}
    del encoder


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


# ----------------------------------------------------------------------------- 4. stage 2: LLM dtype, captioning


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
    G, n, beams = S.gen_batch, S.gen_tokens, cfg.stage2.num_beams
    img = image_tokens(G, cfg.qformer.vision_width, device)

    def gen(m, num_beams):  # run.py's captioning call; min = max tokens so every variant writes equally long captions
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


# ----------------------------------------------------------------------------- report


def mib(x):
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def fmt_ratio(r):
    return f"**{r['median']:.2f}** ({r['q1']:.2f}-{r['q3']:.2f})"


def markdown(res) -> str:
    m = res["meta"]
    L = [f"# minblip2 benchmarks{' (QUICK smoke test: tiny sizes, not results)' if m['quick'] else ''}", "",
         f"{m['date']} | {m['cpu']} | {m['threads']} threads | device {m['device']} | torch {m['torch']} | "
         f"transformers {m['transformers']} | tcmalloc preloaded: {m['tcmalloc']} | whole run {m['wall_s']:.0f} s", "",
         "Ratios are medians over rounds of within-round ratios, (in brackets) the middle half of the rounds. "
         "Absolute times move with the machine's load; trust the ratios. See README.md.", ""]
    if "vs_transformers" in res:
        v = res["vs_transformers"]
        L += ["## 1. Stage-1 step: minblip2 vs transformers' Blip2QFormerModel", "",
              f"ITC+ITM with hard negatives, fwd + bwd + clip + AdamW, batch {v['batch']}, {v['num_queries']} queries, "
              f"text length {v['text_len']}, {NUM_IMAGE_TOKENS} image tokens. Same config, same weights (losses agree "
              f"to {v['loss_parity_fp32']:.1e} in fp32), same loss code; transformers runs attention "
              f"'{v['attn_implementation_transformers']}'.", "",
              "| precision | minblip2 s/step | transformers s/step | minblip2 samples/s | transformers samples/s "
              "| **speed ratio** minblip2 / transformers | peak step memory MiB (minblip2 / transformers) | memory ratio |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ("bf16 autocast", "fp32"):
            e = v[name]
            s, sps, mem = e["seconds"], e["samples_per_s"], e["peak_step_memory_bytes"]
            mr = "n/a" if e["memory_ratio"] is None else f"{e['memory_ratio']:.2f}"
            L.append(f"| {name} | {s['minblip2']['median']:.3f} | {s['transformers']['median']:.3f} | "
                     f"{sps['minblip2']:.1f} | {sps['transformers']:.1f} | {fmt_ratio(e['speed_ratio'])} | "
                     f"{mib(mem['minblip2'])} / {mib(mem['transformers'])} | {mr} |")
        L += ["", "Speed ratio > 1: minblip2 is faster. Memory ratio < 1: minblip2 needs less.", "",
              "With `--qformer.attn_impl=math` (attention written out instead of SDPA, see section 2), minblip2's speed "
              "ratio to transformers is " + " and ".join(
                  f"{fmt_ratio(v[n]['speed_ratio_attn_math'])} ({n})" for n in ("bf16 autocast", "fp32")
                  if "speed_ratio_attn_math" in v[n]) + ".", ""]
    if "wins" in res:
        w = res["wins"]
        L += ["## 2. Each speed-up on its own", "",
              f"Stage-1 step (ITC+ITM+ITG) at the cpu preset: batch {w['batch']}, {w['num_queries']} queries, "
              f"text length {w['text_len']}. Everything else as the preset (reuse on, SDPA, bf16, cached features).", "",
              "| speed-up | variant | baseline | s variant | s baseline | **speed-up** (baseline time / variant time) "
              "| peak step memory MiB variant / baseline |", "|---|---|---|---:|---:|---:|---:|"]
        for e in w["results"]:
            base, mem = e["baseline"], e["peak_step_memory_bytes"]
            for n, r in e["speedup"].items():
                L.append(f"| {e['win']} | {n} | {base} | {e['seconds'][n]['median']:.3f} | "
                         f"{e['seconds'][base]['median']:.3f} | {fmt_ratio(r)} | {mib(mem[n])} / {mib(mem[base])} |")
        L += ["", "Speed-up > 1: the variant's step is faster than the baseline's."]
        L += [f"- *{e['win']}*: {e['what']}." for e in w["results"]]
        L.append("")
    if "stage1_flop_breakdown" in res:
        fb = res["stage1_flop_breakdown"]
        L += ["### Where a stage-1 step's FLOPs go", "",
              f"Forward pass of the step above (batch {fb['batch']}, {fb['num_queries']} queries, ITC+ITM+ITG): "
              f"{fb['total'] / 1e9:.0f} GFLOP (FlopCounterMode); the backward costs about twice as much, split alike.",
              "", "| part | GFLOP | share |", "|---|---:|---:|"]
        L += [f"| {k} | {f / 1e9:.1f} | {100 * f / fb['total']:.0f}% |" for k, f in fb["flops"].items()]
        L.append("")
    for key, title in (("scaling_stage1", "## 3a. Stage-1 step (ITC+ITM+ITG) vs batch size and queries"),
                       ("scaling_stage2", "## 3b. Stage-2 step (Q-Former -> frozen SmolLM2-135M) vs batch size and queries")):
        if key not in res:
            continue
        s = res[key]
        p = s["matmul_flops_per_s"]
        L += [title, "",
              f"Measured in the same rounds: {s['matmul_n']}x{s['matmul_n']} matmul at "
              f"{p['matmul bf16']['median'] / 1e9:.0f} GFLOP/s in bf16 and {p['matmul fp32']['median'] / 1e9:.0f} GFLOP/s "
              "in fp32. Steps run under bf16 autocast, so their FLOP/s are compared with the bf16 matmul.", "",
              "| batch | queries | s/step | samples/s | GFLOP/step | achieved GFLOP/s | **% of bf16 matmul** |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            f = r["fraction_of_bf16_matmul"]
            L.append(f"| {r['batch']} | {r['num_queries']} | {r['seconds']['median']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['flops_per_step'] / 1e9:.0f} | {r['achieved_flops_per_s'] / 1e9:.0f} | "
                     f"**{100 * f['median']:.0f}%** ({100 * f['q1']:.0f}-{100 * f['q3']:.0f}) |")
        L.append("")
    if "stage2" in res:
        s2, g = res["stage2"], res["stage2"]["generation"]
        st = s2["step"]
        L += ["## 4. Stage 2: the frozen LLM in bf16, and captioning speed", "",
              f"{s2['llm']}, {s2['num_queries']} queries, bf16 autocast. Autocast re-casts a frozen (no-grad) fp32 "
              "weight at every forward; `--llm.dtype=bfloat16` (the cpu preset) stores it in bf16 once.", "",
              f"Stage-2 training step, batch {st['batch']}: {st['seconds']['LLM fp32']['median']:.3f} s with the LLM in fp32, "
              f"{st['seconds']['LLM bf16']['median']:.3f} s in bf16: speed-up {fmt_ratio(st['speedup_bf16_llm'])}.", "",
              f"Captioning: batch {g['batch']} images of random image tokens, exactly {g['new_tokens']} new tokens per "
              "caption (min = max new tokens, so every variant writes the same length).", "",
              "| decoding | s/batch | captions/s | tokens/s |", "|---|---:|---:|---:|"]
        for k in g["seconds"]:
            L.append(f"| {k} | {g['seconds'][k]['median']:.3f} | {g['captions_per_s'][k]:.2f} | {g['tokens_per_s'][k]:.1f} |")
        L.append("")
        for dt, r in g["greedy_speedup_over_beam"].items():
            L.append(f"- LLM {dt}: greedy is {fmt_ratio(r)} x as fast as beam search ({g['num_beams']} beams).")
        for d, r in g["bf16_llm_speedup"].items():
            L.append(f"- {d}: the bf16 LLM is {fmt_ratio(r)} x as fast as the fp32 one.")
        L.append("")
    return "\n".join(L)


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
