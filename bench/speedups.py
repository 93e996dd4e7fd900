"""2. Each speed-up on its own, on a full stage-1 step (ITC+ITM+ITG), one switched off at a time: ITG reusing
the queries' keys/values, fused attention (SDPA; training, without attention dropout, inference), bf16 autocast,
fused AdamW, cached image features. Speed-up = baseline time / variant time, paired by round.
"""
from __future__ import annotations

import torch

from common import (NUM_IMAGE_TOKENS, alternate, attention, autocast, caption_tokens, image_tokens, paired_ratio,
                    peak_step_memory, section, spread, stage1_model, stage1_step)
from minblip2.backbones import load_image_encoder


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

    def passes(fast):
        model.scfg.fast_passes = fast
        step()
    compare("fast passes (shared work)", "plain",
            {"fast": lambda: passes(True), "plain": lambda: passes(False)},
            "Stage1Config.fast_passes: Stage1Model.fast_losses (ITC in one pass, the images' keys/values computed once "
            "for ITC and ITM, ITG on the queries' cached keys/values, as LAVIS does) vs plain_losses (one Q-Former "
            "pass per objective, as the paper describes); the same losses")
    model.scfg.fast_passes = True

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
