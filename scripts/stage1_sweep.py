"""The stage-1 measurements behind the cpu preset's choices (README, "Deviations"): short stage-1 runs on
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
from minblip2.run import TestSplit, stage1_retrieval
from minblip2.tasks import ImageTextData, StageTask, build_stage1_model
from minblip2.train import train

ITC = "--stage1.losses=('itc',)"
# every variant starts from config.cpu() with the cpu preset's first recipe (lr 3e-4, [CLS], one lr, no augmented
# views, SDPA attention, 150 steps) and changes one thing at a time
OLD = ["--stage1.lr=3e-4", "--qformer.text_pooling=cls", "--stage1.pretrained_lr_scale=1.0",
       "--data.augmented_views=0", "--qformer.attn_impl=sdpa"]
NOW = [ITC, "--qformer.text_pooling=mean", "--stage1.pretrained_lr_scale=0.1", "--stage1.lr=1e-3"]
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
}
STEPS = 150  # unless a variant says otherwise


def run(name: str, overrides: list[str]) -> dict:
    cfg = config.cpu()
    cfg.stage1.max_steps = STEPS
    cfg = apply_overrides(cfg, OLD + overrides)
    cfg.stage1.ckpt_every = 10**9  # one checkpoint, at the end
    run_dir = REPO_ROOT / "runs" / "stage1-sweep" / name
    device = torch.device("cpu")
    data = ImageTextData.build(cfg, "train", True, device)
    model, tokenizer = build_stage1_model(cfg)
    t0 = time.time()
    task = StageTask(model, data, tokenizer, cfg.data.max_text_len, has_unused_parameters=True, stage=1)
    train(cfg, 1, task=task, resume=False, progress=True, run_dir=run_dir)
    seconds = round(time.time() - t0)
    test = TestSplit(cfg, tokenizer, device)
    k = cfg.stage1.itm_rerank_k if "itm" in cfg.stage1.losses else 0
    rerank, itc, _ = stage1_retrieval(model, test, k, device, cfg.stage1.amp)
    return {"overrides": OLD + overrides, "steps": cfg.stage1.max_steps, "train_seconds": seconds, "itc": itc,
            "rerank": rerank, "train_loss_last10": _last10(run_dir)}


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
