"""What every benchmark shares: running variants in alternating rounds and the statistics of per-round ratios
(see run.py's docstring for why), a step's peak memory, the synthetic inputs, the training steps as train.py runs
them, and the attention variants.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time

import torch

from minblip2.qformer import Attention
from minblip2.stage1 import Stage1Model
from minblip2.stage2 import Stage2Model
from minblip2.tasks import build_stage2_model
from minblip2.train import build_optimizer

NUM_IMAGE_TOKENS = 257  # DINOv2 ViT-S/14 at 224 px: 16 x 16 patches + [CLS]
T0 = time.time()  # section() prints the seconds since here; run.py reports the whole run's wall time from it


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


# ----------------------------------------------------------------------------- memory


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
    matmul -> mask -> softmax -> dropout -> matmul. "sdpa, no attention dropout": SDPA with every layer's attention
    dropout set to 0 (here, restored after). On CPU, SDPA only has a fused kernel WITHOUT dropout; training (dropout
    0.1 on the attention probabilities, BERT's recipe) falls back to unfused math. This variant shows what dropping
    that dropout buys. (Not by patching F.scaled_dot_product_attention: the lower-right causal mask ITG passes
    dispatches only when F's attribute IS torch's function, so a patched one fails on it.)
    """
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    dropouts = [m.dropout for m in layers]
    for m in layers:
        m.impl = "math" if kind == "manual" else "sdpa"
        if kind == "sdpa, no attention dropout":
            m.dropout = 0.0
    try:
        yield
    finally:
        for m, p in zip(layers, dropouts):
            m.impl, m.dropout = "sdpa", p

