"""The stage-1 measurements behind the cpu preset's choices (docs/deviations.md): short stage-1 runs on
coco-mini that differ in one setting, each scored on the test split (ITC ranking and, with ITM, re-ranking).

    .venv/bin/python scripts/stage1_sweep.py                 # all variants, ~40 min on 2 cores
    .venv/bin/python scripts/stage1_sweep.py itc_mean_3e4    # just one

Writes results/stage1-sweep.json (one entry per variant; re-running a variant replaces its entry).
"""
import json
import sys
import time

import torch

from minblip2 import config
from minblip2.config import REPO_ROOT, apply_overrides
from minblip2.tools.diagnostics import stage1_query_stats
from minblip2.tools.baselines import pooled_image_features
from minblip2.tools.coco_mini import TestSplit, linear_probe_retrieval, stage1_retrieval
from minblip2.tasks import ImageTextData, Stage1Task, build_stage1_model
from minblip2.train import train

ITC = "--stage1.losses=('itc',)"
# every variant starts from config.cpu() with the cpu preset's first recipe (lr 3e-4, [CLS], one lr, no augmented
# views, SDPA attention, 150 steps) and changes one thing at a time
OLD = ["--stage1.lr=3e-4", "--qformer.text_pooling=cls", "--stage1.pretrained_lr_scale=1.0",
       "--data.augmented_views=0", "--qformer.attn_impl=sdpa"]
NOW = [ITC, "--qformer.text_pooling=mean", "--stage1.pretrained_lr_scale=0.1", "--stage1.lr=1e-3"]
CLS_ONLY = "cls_only"  # not config overrides: handled in run()
POOL2 = "pool2"  # the 16x16 patch grid average-pooled 2x2 -> [CLS] + 64 tokens
XQK3 = "xqk3"  # cross-attention query/key weights x3 after init: attention logits x9, less uniform at the start
TWEAKS = (CLS_ONLY, POOL2, XQK3)
V6 = ["--stage1.max_steps=300", "--data.augmented_views=6", "--qformer.attn_impl=math"]
VARIANTS = {
    "itc_cls_3e4": [ITC],
    "itc_mean_3e4": [ITC, "--qformer.text_pooling=mean"],
    "itc_mean_1e4": [ITC, "--qformer.text_pooling=mean", "--stage1.lr=1e-4"],
    "itc_mean_3e4_s01": [ITC, "--qformer.text_pooling=mean", "--stage1.pretrained_lr_scale=0.1"],
    "itc_mean_1e3_s01": [ITC, "--qformer.text_pooling=mean", "--stage1.pretrained_lr_scale=0.1", "--stage1.lr=1e-3"],
    "full_mean_1e3_s01": ["--qformer.text_pooling=mean", "--stage1.pretrained_lr_scale=0.1", "--stage1.lr=1e-3"],
    # longer, without and with cached augmented views: does the Q-Former overfit 480 images?
    "itc_mean_1e3_s01_450": NOW + ["--stage1.max_steps=450"],
    "itc_mean_1e3_s01_450_views6": NOW + ["--stage1.max_steps=450", "--data.augmented_views=6"],
    # the cpu preset's 300 steps with 6 views; then the BERT-initialised weights frozen (scale 0: only the
    # queries, cross-attention, ln_vision and the projections learn; the text side is then the probe's MiniLM)
    "itc_views6_300": NOW + V6,
    "itc_views6_300_s0": NOW + V6 + ["--stage1.pretrained_lr_scale=0.0"],
    "itc_views6_300_s001": NOW + V6 + ["--stage1.pretrained_lr_scale=0.01"],
    # a diagnosis, not a recipe: the queries see ONLY DINOv2's [CLS] token (the probe's image input), so
    # cross-attention has nothing to choose; is the gap to the probe in choosing where to look?
    "itc_views6_300_cls_only": NOW + V6 + [CLS_ONLY],
    # the queries pass a LayerNorm before anything reads them, so their init scale only sets how far one Adam
    # step (~lr per coordinate) moves them relative to their size: 0.02 at lr 1e-3 is 5% per step
    "itc_views6_300_qstd1": NOW + V6 + ["--qformer.query_init_std=1.0"],
    "itc_views6_300_pool2": NOW + V6 + [POOL2],
    "itc_views6_300_xqk3": NOW + V6 + [XQK3],
    # generation alone (no contrastive loss): do its queries stay apart? (scripts/stage2_sweep.py s1itg_120
    # starts stage 2 from this run)
    "itg_views6_300": [o for o in NOW if o != ITC] + ["--stage1.losses=('itg',)"] + V6,
    # the linear probe of the main job on other pooled image features: [CLS] (the main job's), the mean of the
    # 256 patch tokens (what uniform cross-attention reads), both concatenated
    "probe_cls": [], "probe_mean_patches": [], "probe_cls_and_mean": [],
}
POOLS = {"probe_cls": pooled_image_features, "probe_mean_patches": lambda f: f[:, 1:].float().mean(1),
         "probe_cls_and_mean": lambda f: torch.cat([f[:, 0].float(), f[:, 1:].float().mean(1)], -1)}
STEPS = 150  # unless a variant says otherwise


def run(name: str, overrides: list[str]) -> dict:
    if name in POOLS:
        return run_probe(POOLS[name])
    cfg = config.cpu()
    cfg.stage1.max_steps = STEPS
    cfg = apply_overrides(cfg, OLD + [o for o in overrides if o not in TWEAKS])
    cfg.stage1.ckpt_every = 10**9  # one checkpoint, at the end
    run_dir = REPO_ROOT / "runs" / "stage1-sweep" / name
    device = torch.device("cpu")
    data = ImageTextData.build(cfg, "train", True, device)
    data.features, data.views = _tokens(data.features, overrides), [_tokens(v, overrides) for v in data.views]
    model, tokenizer = build_stage1_model(cfg)
    if XQK3 in overrides:
        with torch.no_grad():
            for layer in model.qformer.layers:
                if layer.cross_attn is not None:
                    layer.cross_attn.query.weight.mul_(3)
                    layer.cross_attn.key.weight.mul_(3)
    t0 = time.time()
    task = Stage1Task(model, data, has_unused_parameters=True, tokenizer=tokenizer,
                      max_text_len=cfg.data.max_text_len)
    train(cfg, 1, task=task, resume=False, progress=True, run_dir=run_dir)
    seconds = round(time.time() - t0)
    test = TestSplit(cfg, tokenizer, device)
    test.features = _tokens(test.features, overrides)
    k = cfg.eval.itm_rerank_k if "itm" in cfg.stage1.losses else 0
    rerank, itc, _ = stage1_retrieval(model, test, k, device, cfg.stage1.amp)
    return {"overrides": OLD + overrides, "steps": cfg.stage1.max_steps, "train_seconds": seconds, "itc": itc,
            "rerank": rerank, "train_loss_last10": _last10(run_dir),
            "query_cos": stage1_query_stats(model, test.features[:64])["query_cos"]}


def run_probe(pool) -> dict:
    """The main job's linear probe (same pairs, views, loss, steps, lr) on `pool`ed image tokens."""
    cfg, device = config.cpu(), torch.device("cpu")
    data = ImageTextData.build(cfg, "train", True, device)
    _, tokenizer = build_stage1_model(cfg)
    return {"steps": cfg.stage1.max_steps,
            "itc": linear_probe_retrieval(cfg, data, TestSplit(cfg, tokenizer, device), pool)}


def _tokens(feats, overrides):
    """The image tokens a variant's queries see: all 257, only [CLS], or [CLS] + 2x2-pooled patches."""
    if CLS_ONLY in overrides:
        return feats[:, :1]
    if POOL2 in overrides:
        B, N, D = feats.shape
        g = int((N - 1) ** 0.5)
        grid = feats[:, 1:].float().view(B, g, g, D).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        return torch.cat([feats[:, :1].float(), pooled], 1).to(feats.dtype)
    return feats


def _last10(run_dir) -> float:
    import csv
    with open(run_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return round(sum(float(r["loss"]) for r in rows[-10:]) / len(rows[-10:]), 3)


def main(names):
    out = REPO_ROOT / "results" / "stage1-sweep.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in names or VARIANTS:  # ("_note" in the file is for readers)
        results[name] = run(name, VARIANTS[name])
        print(name, json.dumps(results[name]), flush=True)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
