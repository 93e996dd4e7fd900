"""The stage-2 measurements behind the cpu preset's stage-2 recipe: short stage-2 runs on coco-mini that
differ in one setting, each scored on the test split with the main job's caption metrics.

    .venv/bin/python scripts/stage2_sweep.py                  # all variants
    .venv/bin/python scripts/stage2_sweep.py s1_lr1e3          # just one

Variants "s1_*" start from the main job's stage-1 checkpoint (runs/coco-mini/stage1: run `make run` first),
"nos1_*" from a randomly initialised Q-Former. Writes results/stage2-sweep.json (one entry per variant).
"""
import json
import sys
import time

import torch

from minblip2 import config
from minblip2.caption_eval import caption_metrics
from minblip2.config import REPO_ROOT, apply_overrides
from minblip2.diagnostics import image_use
from minblip2.run import TestSplit, generate_captions
from minblip2.tasks import ImageTextData, StageTask, build_stage1_model, build_stage2_model
from minblip2.train import train
from stage1_sweep import _last10  # scripts/ is on the path when this file runs

VARIANTS = {
    "s1_lr3e4": [],
    "nos1_lr3e4": ["--stage2.from_stage1=False"],
    "s1_lr1e3": ["--stage2.lr=1e-3"],
    "nos1_lr1e3": ["--stage2.from_stage1=False", "--stage2.lr=1e-3"],
    "s1_proj1e3_qf01": ["--stage2.lr=1e-3", "--stage2.pretrained_lr_scale=0.1"],
    "s1_proj1e3_qf0": ["--stage2.lr=1e-3", "--stage2.pretrained_lr_scale=0.0"],
    # four times the main job's stage 2: does either start reading the image?
    "s1_480": ["--stage2.max_steps=480"],
    "nos1_480": ["--stage2.from_stage1=False", "--stage2.max_steps=480"],
}
STAGE1_DIR = REPO_ROOT / "runs" / "coco-mini" / "stage1"


def run(name: str, overrides: list[str]) -> dict:
    cfg = apply_overrides(config.cpu(), overrides)
    cfg.stage2.ckpt_every = 10**9  # one checkpoint, at the end
    run_dir = REPO_ROOT / "runs" / "stage2-sweep" / name
    device = torch.device("cpu")
    data = ImageTextData.build(cfg, "train", True, device)
    model = build_stage2_model(cfg, stage1_dir=STAGE1_DIR if cfg.stage2.from_stage1 else None)
    t0 = time.time()
    train(cfg, 2, task=StageTask(model, data, stage=2), resume=False, progress=True, run_dir=run_dir)
    seconds = round(time.time() - t0)
    _, tokenizer = build_stage1_model(cfg)
    test = TestSplit(cfg, tokenizer, device)
    preds = generate_captions(model, test.features, 16, cfg.stage2.num_beams, cfg.stage2.max_new_tokens, device,
                              cfg.stage2.amp, cfg.stage2.no_repeat_ngram_size)
    metrics = caption_metrics(dict(zip(test.image_ids, preds)), dict(zip(test.image_ids, test.captions)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cpu preset's amp
        use = image_use(model, test.features[:96], [caps[0] for caps in test.captions[:96]])
    return {"overrides": overrides, "steps": cfg.stage2.max_steps, "train_seconds": seconds,
            "metrics": {k: round(v, 2) for k, v in metrics.items()}, "train_loss_last10": _last10(run_dir),
            "distinct_captions": len(set(preds)), "examples": preds[:4], "image_use": use}


def main(names):
    out = REPO_ROOT / "results" / "stage2-sweep.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in names or VARIANTS:
        results[name] = run(name, VARIANTS[name])
        print(name, json.dumps(results[name]), flush=True)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
