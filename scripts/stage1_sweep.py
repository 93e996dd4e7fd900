"""The stage-1 measurements behind the cpu preset's choices (README, "Deviations"): short stage-1 runs on
coco-mini that differ in one setting, each scored on the test split (ITC ranking and, with ITM, re-ranking).

    .venv/bin/python scripts/stage1_sweep.py                 # all variants, ~25 min on 2 cores
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
# every variant starts from config.cpu() with the cpu preset's old recipe (lr 3e-4, [CLS], one lr) and changes one thing
OLD = ["--stage1.lr=3e-4", "--qformer.text_pooling=cls", "--stage1.pretrained_lr_scale=1.0"]
VARIANTS = {
    "itc_cls_3e4": [ITC],
    "itc_mean_3e4": [ITC, "--qformer.text_pooling=mean"],
    "itc_mean_1e4": [ITC, "--qformer.text_pooling=mean", "--stage1.lr=1e-4"],
    "itc_mean_3e4_s01": [ITC, "--qformer.text_pooling=mean", "--stage1.pretrained_lr_scale=0.1"],
    "itc_mean_1e3_s01": [ITC, "--qformer.text_pooling=mean", "--stage1.pretrained_lr_scale=0.1", "--stage1.lr=1e-3"],
    "full_mean_1e3_s01": ["--qformer.text_pooling=mean", "--stage1.pretrained_lr_scale=0.1", "--stage1.lr=1e-3"],
}
STEPS = 150


def run(name: str, overrides: list[str]) -> dict:
    cfg = apply_overrides(config.cpu(), OLD + overrides)
    cfg.stage1.max_steps, cfg.stage1.ckpt_every = STEPS, 10**9  # one checkpoint, at the end
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
    return {"overrides": OLD + overrides, "steps": STEPS, "train_seconds": seconds, "itc": itc, "rerank": rerank}


def main(names):
    out = REPO_ROOT / "results" / "stage1-sweep.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in names or VARIANTS:  # ("_note" in the file is for readers)
        results[name] = run(name, VARIANTS[name])
        print(name, json.dumps(results[name]), flush=True)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
