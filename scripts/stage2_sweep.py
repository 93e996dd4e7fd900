"""The stage-2 measurements behind the cpu preset's stage-2 recipe: short stage-2 runs on coco-mini that
differ in one setting, each scored on the test split with the main job's caption metrics.

    .venv/bin/python scripts/stage2_sweep.py                  # all variants
    .venv/bin/python scripts/stage2_sweep.py s1_lr1e3          # just one

Variants "s1_*" start from the main job's stage-1 checkpoint (runs/coco-mini/stage1: run `make run` first),
"nos1_*" from a randomly initialised Q-Former, "bert_*" from an untrained BERT-initialised one (how stage 1
starts), "s1itg_*" from a stage-1 sweep run (OTHER_STAGE1). Writes results/stage2-sweep.json (one entry per
variant).
"""
import json
import sys
import time

import torch

from minblip2 import config, runtime
from minblip2.caption_eval import caption_metrics
from minblip2.config import REPO_ROOT, apply_overrides
from minblip2.tools.diagnostics import image_use
from minblip2.tools.coco_mini import TestSplit, generate_captions
from minblip2.tasks import ImageTextData, Stage2Task, build_stage1_model, build_stage2_model
from minblip2.train import train
from stage1_sweep import _last10  # scripts/ is on the path when this file runs

# not config overrides: handled in run()
ZERO_PROJ, QUERY_BIAS, BIAS_INIT, NO_IMAGE, BERT = "zero_proj", "query_bias", "bias_init", "no_image", "bert"
TWEAKS = (ZERO_PROJ, QUERY_BIAS, BIAS_INIT, NO_IMAGE, BERT)
VARIANTS = {
    "s1_lr3e4": [],  # = the main job's minblip2 and no_stage1 rows (results/coco-mini.json)
    "nos1_lr3e4": ["--stage2.from_stage1=False"],
    "s1_lr1e3": ["--stage2.lr=1e-3"],
    "nos1_lr1e3": ["--stage2.from_stage1=False", "--stage2.lr=1e-3"],
    "s1_proj1e3_qf01": ["--stage2.lr=1e-3", "--stage2.pretrained_lr_scale=0.1"],
    "s1_proj1e3_qf0": ["--stage2.lr=1e-3", "--stage2.pretrained_lr_scale=0.0"],
    # four times the main job's stage 2: does either start reading the image?
    "s1_480": ["--stage2.max_steps=480"],
    "nos1_480": ["--stage2.from_stage1=False", "--stage2.max_steps=480"],
    # the main job's 120 steps from a stage 1 trained with ITG alone (scripts/stage1_sweep.py itg_views6_300)
    "s1itg_120": [],
    # diagnoses, not recipes (handled in run()): llm_proj's weight starts at zero, so the LLM first sees a
    # constant prompt and the image enters as training finds it useful; a learned per-query vector added
    # after llm_proj, so collapsed queries can still give the LLM 16 different prompt tokens
    "s1_zero_proj": [ZERO_PROJ],
    "s1_query_bias": [QUERY_BIAS],
    # the same vectors started at the LLM's token-embedding scale (a zero start barely moves at lr 3e-4)
    "s1_query_bias_init": [QUERY_BIAS, BIAS_INIT],
    # every image's tokens replaced by zeros (train and test): what stage 2 learns with no image at all
    "nos1_no_image": ["--stage2.from_stage1=False", NO_IMAGE],
    # no stage 1, but the Q-Former initialised from BERT (MiniLM) as stage 1 starts it (fresh queries and
    # cross-attention): is it stage-1 TRAINING that slows stage 2, or the BERT weights?
    "bert_120": ["--stage2.from_stage1=False", BERT],
    "bert_480": ["--stage2.from_stage1=False", BERT, "--stage2.max_steps=480"],
}
STAGE1_DIR = REPO_ROOT / "runs" / "coco-mini" / "stage1"
OTHER_STAGE1 = {"s1itg_120": REPO_ROOT / "runs" / "stage1-sweep" / "itg_views6_300"}


class ProjWithQueryBias(torch.nn.Module):
    def __init__(self, proj: torch.nn.Linear, num_queries: int):
        super().__init__()
        self.proj = proj
        self.query_bias = torch.nn.Parameter(torch.zeros(num_queries, proj.out_features))

    @property
    def weight(self):  # Stage2Model reads llm_proj.weight for its device
        return self.proj.weight

    def forward(self, q):  # (B, Q, H) -> (B, Q, D)
        return self.proj(q) + self.query_bias


def run(name: str, overrides: list[str]) -> dict:
    cfg = apply_overrides(config.cpu(), [o for o in overrides if o not in TWEAKS])
    cfg.stage2.ckpt_every = 10**9  # one checkpoint, at the end
    run_dir = REPO_ROOT / "runs" / "stage2-sweep" / name
    device = torch.device("cpu")
    data = ImageTextData.build(cfg, "train", True, device)
    if NO_IMAGE in overrides:
        data.features, data.views = torch.zeros_like(data.features), [torch.zeros_like(v) for v in data.views]
    model = build_stage2_model(cfg, stage1_dir=OTHER_STAGE1.get(name, STAGE1_DIR))  # unused if not from_stage1
    untrained_stage1, tokenizer = build_stage1_model(cfg)  # BERT-initialised, as stage 1 starts
    if BERT in overrides:
        model.from_stage1(untrained_stage1.state_dict())
    if ZERO_PROJ in overrides:
        torch.nn.init.zeros_(model.llm_proj.weight)
    if QUERY_BIAS in overrides:
        model.llm_proj = ProjWithQueryBias(model.llm_proj, cfg.qformer.num_queries)
        if BIAS_INIT in overrides:
            with torch.no_grad():
                model.llm_proj.query_bias.normal_(0, model.llm.get_input_embeddings().weight.float().std().item())
    t0 = time.time()
    train(cfg, 2, task=Stage2Task(model, data), resume=False, progress=True, run_dir=run_dir)
    seconds = round(time.time() - t0)
    test = TestSplit(cfg, tokenizer, device)
    if NO_IMAGE in overrides:
        test.features = torch.zeros_like(test.features)
    preds = generate_captions(model, test.features, 16, cfg.eval.num_beams, cfg.eval.max_new_tokens, device,
                              cfg.stage2.amp, cfg.eval.no_repeat_ngram_size)
    metrics = caption_metrics(dict(zip(test.image_ids, preds)), dict(zip(test.image_ids, test.captions)))
    with runtime.autocast(cfg.stage2.amp, device):
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
