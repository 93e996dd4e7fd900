"""The recipe search behind the cpu preset (issue: make BLIP-2 visibly work at course scale), scored on coco-mini VAL.

Each variant = a stage-1 start (a stage-1 run with some overrides, or "bert" = the untrained BERT-initialised
Q-Former, or "random") + stage 2 with some overrides, trained on the 480 training images and scored on the 70
validation images (never test): caption CIDEr/BLEU-4 of the stage-2 model; retrieval R@K of the stage-1 run.

    .venv/bin/python scripts/recipe_sweep.py NAME [NAME ...] [--seeds 0,1]

Stage-1 runs are shared between variants (runs/recipe/stage1/<s1>-s<seed>/). Writes results/recipe-sweep.json.
"""
import argparse
import json
import sys
import time

import torch

from minblip2 import config, dist
from minblip2.baselines import nearest_neighbour_captions, pooled_image_features
from minblip2.caption_eval import caption_metrics
from minblip2.config import REPO_ROOT, apply_overrides
from minblip2.run import TestSplit, _captions_per_image, generate_captions, linear_probe_retrieval, stage1_retrieval
from minblip2.tasks import ImageTextData, StageTask, build_stage1_model, build_stage2_model
from minblip2.train import latest_checkpoint, load_trainable_state, seed_everything, train
from safetensors.torch import load_file

S1 = {  # stage-1 recipes (overrides of the cpu preset)
    "preset": [],
}
MAIN_STAGE1 = REPO_ROOT / "runs" / "coco-mini" / "stage1"  # "main": the stage-1 run of `make run`
VARIANTS = {  # name: (stage-1 start, stage-1 steps, stage-2 overrides)
    # 360 stage-2 steps from the main job's stage 1 / a random Q-Former / stage 1 with llm_proj trained alone
    # for the first 100 steps (the Q-Former frozen: "linear probing, then fine-tuning")
    "main_360": ("main", 300, ["--stage2.max_steps=360"]),
    "random_360": ("random", 0, ["--stage2.max_steps=360"]),
    "main_360_lpft100": ("main", 300, ["--stage2.max_steps=360", "--stage2.pretrained_frozen_steps=100"]),
    "random_480": ("random", 0, ["--stage2.max_steps=480"]),
    "bert_480": ("bert", 0, ["--stage2.max_steps=480"]),
    "s1_480": ("preset", 300, ["--stage2.max_steps=480"]),
    "s1_480_lp": ("preset", 300, ["--stage2.max_steps=480", "--stage2.pretrained_lr_scale=0.0",
                                  "--stage2.lr=1e-3"]),
}
OUT = REPO_ROOT / "results" / "recipe-sweep.json"
RUNS = REPO_ROOT / "runs" / "recipe"


def stage1_run(cfg, s1: str, steps: int, seed: int):
    """Train (or reuse) a stage-1 run; returns its directory and retrieval on val."""
    c = apply_overrides(config.cpu(), S1[s1])
    c.stage1.max_steps, c.stage1.seed, c.stage1.ckpt_every = steps, seed, 10**9
    run_dir = RUNS / "stage1" / f"{s1}-{steps}-s{seed}"
    data = ImageTextData.build(c, "train", True, torch.device("cpu"))
    seed_everything(seed)
    model, tok = build_stage1_model(c)
    if latest_checkpoint(run_dir / "checkpoints") is None:
        train(c, 1, task=StageTask(model, data, tok, c.data.max_text_len, stage=1), run_dir=run_dir)
    else:
        load_trainable_state(model, load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors")))
    return run_dir, model, tok, data


def run(name: str, seed: int) -> dict:
    s1, s1_steps, s2_over = VARIANTS[name]
    device = torch.device("cpu")
    cfg = apply_overrides(config.cpu(), s2_over)
    cfg.stage2.seed, cfg.stage2.ckpt_every = seed, 10**9
    res = {"stage1": s1, "stage1_steps": s1_steps, "stage2_overrides": s2_over, "seed": seed}
    data = ImageTextData.build(cfg, "train", True, device)
    seed_everything(seed)
    untrained, tok = build_stage1_model(cfg)
    val = TestSplit(cfg, tok, device, split="val")
    if s1 == "main":
        s1_dir = MAIN_STAGE1
    elif s1 not in ("random", "bert"):
        s1_dir, s1_model, _, _ = stage1_run(cfg, s1, s1_steps, seed)
        k = cfg.stage1.itm_rerank_k
        res["retrieval_rerank"], res["retrieval_itc"], _ = stage1_retrieval(s1_model, val, k, device, cfg.stage1.amp)
    seed_everything(seed + 1)
    cfg.stage2.from_stage1 = s1 not in ("random", "bert")
    model = build_stage2_model(cfg, stage1_dir=s1_dir if cfg.stage2.from_stage1 else None)
    if s1 == "bert":
        model.from_stage1(untrained.state_dict())
    run_dir = RUNS / "stage2" / f"{name}-s{seed}"
    t0 = time.time()
    train(cfg, 2, task=StageTask(model, data, stage=2), run_dir=run_dir)
    res["train_seconds"] = round(time.time() - t0)
    preds = generate_captions(model, val.features, 16, cfg.stage2.num_beams, cfg.stage2.max_new_tokens, device,
                              cfg.stage2.amp, cfg.stage2.no_repeat_ngram_size)
    m = caption_metrics(dict(zip(val.image_ids, preds)), dict(zip(val.image_ids, val.captions)))
    res["val_captions"] = {k: round(v, 2) for k, v in m.items()}
    res["distinct"] = len(set(preds))
    res["examples"] = preds[:4]
    return res


def baselines(seed: int = 1337) -> dict:
    """Nearest-neighbour captions and the linear probe on val (their settings: the main job's)."""
    cfg, device = config.cpu(), torch.device("cpu")
    data = ImageTextData.build(cfg, "train", True, device)
    _, tok = build_stage1_model(cfg)
    val = TestSplit(cfg, tok, device, split="val")
    nn = nearest_neighbour_captions(pooled_image_features(data.features), _captions_per_image(data),
                                    pooled_image_features(val.features))
    m = caption_metrics(dict(zip(val.image_ids, nn)), dict(zip(val.image_ids, val.captions)))
    return {"nearest_neighbour": {k: round(v, 2) for k, v in m.items()},
            "linear_probe": linear_probe_retrieval(cfg, data, val)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="+")
    p.add_argument("--seeds", default="1337")
    a = p.parse_args()
    for name in a.names:
        for seed in map(int, a.seeds.split(",")):
            key = f"{name}/s{seed}"
            res = baselines(seed) if name == "baselines" else run(name, seed)
            print(key, json.dumps(res), flush=True)
            results = json.loads(OUT.read_text()) if OUT.exists() else {}  # read late: variants may run in parallel
            results[key] = res
            OUT.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
