"""The recipe search behind the cpu preset (issue: make BLIP-2 visibly work at course scale), scored on coco-mini VAL.

Each variant = a stage-1 start (a stage-1 run with some overrides, or "bert" = the untrained BERT-initialised
Q-Former, or "random") + stage 2 with some overrides, trained on the 480 training images and scored on the 70
validation images (never test): caption CIDEr/BLEU-4 of the stage-2 model; retrieval R@K of the stage-1 run.

    .venv/bin/python scripts/recipe_sweep.py NAME [NAME ...] [--seeds 0,1]
    .venv/bin/python scripts/recipe_sweep.py --table --plot     (docs/recipe.md's tables; results/data-scaling.png)

Stage-1 runs are shared between variants (runs/recipe/stage1/<s1>-s<seed>/). Writes results/recipe-sweep.json.
"""
import argparse
import fcntl
import json
import os
import re
import subprocess
import time

import torch
import torch.nn.functional as F

from minblip2 import config, losses, runtime
from minblip2.backbones import load_llm
from minblip2.tools.baselines import LinearProjectionModel, nearest_neighbour_captions, pooled_image_features
from minblip2.caption_eval import caption_metrics
from minblip2.tools.diagnostics import image_use, query_cos_by_layer
from minblip2.tools.plots import data_scaling, query_collapse, scaling_points
from minblip2.config import REPO_ROOT, apply_overrides
from minblip2.tools.coco_mini import TestSplit, _captions_per_image, generate_captions, linear_probe_retrieval, stage1_retrieval
from minblip2.qformer import init_bert_weights
from minblip2.stage1 import Stage1Model
from minblip2.data import pre_caption
from minblip2.tasks import ImageTextData, Stage1Task, Stage2Task, build_stage1_model, build_stage2_model
from minblip2.train import seed_everything, train
from minblip2.checkpoint import latest_checkpoint, load_trainable_state
from safetensors.torch import load_file

S1 = {  # stage-1 recipes: overrides of the cpu preset (--qformer.* ones apply to stage 2 too) and TWEAKS
    "preset": [],
    "noitm": ["--stage1.losses=('itc','itg')"],  # ITM averages its logit over the queries: does it make them alike?
    "itg3": ["itg_weight=3"],  # ITG is what keeps the queries apart (query_cos 0.945 with it, 1.0 without)
    "q8": ["--qformer.num_queries=8"],
    "q32": ["--qformer.num_queries=32"],  # the paper's count
    "qffn_fresh": ["query_ffn_fresh"],  # the query path's FFNs start fresh instead of from MiniLM's FFNs
    # the fresh cross-attention (and queries) at 3x the preset's lr, the BERT-initialised weights still at 1e-4
    "xattn3x": ["--stage1.lr=3e-3", "--stage1.pretrained_lr_scale=0.0333"],
    # the collapse starts where the fresh cross-attention reads the patch mean: slower fresh weights
    "lr3e4": ["--stage1.lr=3e-4", "--stage1.pretrained_lr_scale=0.333"],  # fresh 3e-4, BERT's 1e-4
    "lr1e4": ["--stage1.lr=1e-4", "--stage1.pretrained_lr_scale=1.0"],  # the paper's one learning rate
    # the collapse grows in the BERT-initialised self-attention: keep MiniLM's weights (almost) as they were
    "bert001": ["--stage1.pretrained_lr_scale=0.01"], "bertfrozen": ["--stage1.pretrained_lr_scale=0.0"],
    # the stage-1 losses end the same whether the queries collapse or not: tell stage 1 to keep them apart
    "div1": ["query_div=1"], "div03": ["query_div=0.3"],
    "div1h": ["query_div=1", "on_hidden"],  # the same on the query outputs (what stage 2 reads)
    # the package's version: losses.query_similarity on a dropout-free pass of the queries (div1h's term saw the
    # training pass, and the main job's run met it with dropout noise)
    "qsim1": ["--stage1.query_sim_weight=1"],
    "cls": ["cls_only"],  # the queries see only DINOv2's [CLS] token, the linear probe's input (a diagnosis)
    # the shipped stage 1 since the term became the per-image mean SQUARED cosine (qsim1 above: the signed mean of
    # an earlier version, kept as measured), and the four preset settings re-measured against it (issue 29)
    "sq1": ["--stage1.query_sim_weight=1"],
    "sq1_views0": ["--stage1.query_sim_weight=1", "--data.augmented_views=0"],
    "sq1_cls": ["--stage1.query_sim_weight=1", "--qformer.text_pooling=cls"],
    "sq1_lr3e4": ["--stage1.query_sim_weight=1", "--stage1.lr=3e-4", "--stage1.pretrained_lr_scale=0.333"],
    "sq1_bert1": ["--stage1.query_sim_weight=1", "--stage1.pretrained_lr_scale=1.0"],
    "sq03": ["--stage1.query_sim_weight=0.3"],
    # lesson-sized stage 1s (issue 26: about 5 minutes on 2 cores without AMX): the shipped recipe at fewer samples
    # per step and fewer steps; their VARIANTS below give each a lesson-sized stage 2 (the preset's recipe, shorter)
    "Lb32": ["--stage1.query_sim_weight=1", "--stage1.warmup_steps=3"],
    "Lb16": ["--stage1.query_sim_weight=1", "--stage1.batch_size=16", "--stage1.warmup_steps=5"],
    "Lb8": ["--stage1.query_sim_weight=1", "--stage1.batch_size=8", "--stage1.warmup_steps=10"],
    "Lb16q8": ["--stage1.query_sim_weight=1", "--stage1.batch_size=16", "--stage1.warmup_steps=5",
               "--qformer.num_queries=8"],
    # the same without the augmented views (a short run sees each caption less than once, so views add little):
    # a first run then encodes 480 images once instead of 7 times
    "Lb16q8v0": ["--stage1.query_sim_weight=1", "--stage1.batch_size=16", "--stage1.warmup_steps=5",
                 "--qformer.num_queries=8", "--data.augmented_views=0"],
    # the lesson recipe collapsed its queries at 1 seed of 3 (step 8, at the peak lr, gradient norm ~95; then
    # stuck at one vector, where the squared term has no gradient): a longer warmup, or a heavier term
    "Lb16q8v0w15": ["--stage1.query_sim_weight=1", "--stage1.batch_size=16", "--stage1.warmup_steps=15",
                    "--qformer.num_queries=8", "--data.augmented_views=0"],
    "Lb16q8v0qs3": ["--stage1.query_sim_weight=3", "--stage1.batch_size=16", "--stage1.warmup_steps=5",
                    "--qformer.num_queries=8", "--data.augmented_views=0"],
    "n60": ["n_train=60"], "n120": ["n_train=120"], "n240": ["n_train=240"],  # the data-scaling curve
}
# Tweaks that are not config fields (kept out of the package unless a measurement here earns them a place):
#   itg_weight=W        stage 1's loss = itc + itm + W * itg
#   query_ffn_fresh     re-initialise the query FFNs (BERT init) and train them at the fresh weights' lr
#   query_div=W         stage 1's loss += W * the mean cosine between two ITC query features of an image (if > 0)
#   on_hidden           query_div on the query outputs of the ITC pass (B, Q, H) instead of their ITC features
#   n_train=N           train (both stages, the probe and nearest neighbour) on N of the 480 training images
#   cls_only            the Q-Former sees only the [CLS] token of each image (training and scoring; stage 1 only)
#   stage1_seed=S       (stage 2's list) reuse the stage-1 run of seed S, so only stage 2's seed varies
#   stage1_only         (stage 2's list) score the stage-1 run's retrieval and stop: no stage 2
TWEAK_KEYS = ("itg_weight", "query_div", "on_hidden", "query_ffn_fresh", "n_train", "cls_only", "stage1_only",
              "stage1_seed", "projector")
PROJECTORS = ("linear", "mlp")  # the "projector=K" tweak's stage-2 models: no Q-Former (tools/baselines.py)
# "main": the stage-1 run of `make run` (the main_* rows used it when the preset had the paper's three losses)
MAIN_STAGE1 = REPO_ROOT / "runs" / "coco-mini" / "stage1"
# the lessons' stage 2 (lesson 6): the preset's shares of 360 steps at 240 steps of 8, no augmented views
LESSON_S2 = ["--stage2.max_steps=240", "--stage2.batch_size=8", "--stage2.pretrained_frozen_steps=67",
             "--stage2.warmup_steps=10", "--data.augmented_views=0"]
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
    # the hypotheses of the issue, one factor at a time; stage 2 from stage 1 = main_360_lpft100's recipe
    "bert_360": ("bert", 0, ["--stage2.max_steps=360"]),
    "main_360_lpft100_qf01": ("main", 300, ["--stage2.max_steps=360", "--stage2.pretrained_frozen_steps=100",
                                            "--stage2.pretrained_lr_scale=0.1"]),  # stage-2 lr per group
    "main_360_qf01": ("main", 300, ["--stage2.max_steps=360", "--stage2.pretrained_lr_scale=0.1"]),
    **{f"{s1}_360_lpft100": (s1, 300, ["--stage2.max_steps=360", "--stage2.pretrained_frozen_steps=100"])
       for s1 in ("preset", "noitm", "itg3", "q8", "q32", "qffn_fresh", "n60", "n120", "n240", "lr3e4", "lr1e4",
                  "bert001", "bertfrozen", "div1", "div03", "div1h", "qsim1")},
    # the main job's stage-2 length (120 steps, one learning rate) from each start
    **{f"{s1}_120": (s1, 0 if s1 in ("random", "bert") else 300, ["--stage2.max_steps=120"])
       for s1 in ("random", "bert", "div1", "div1h", "qsim1")},
    "preset900_360_lpft100": ("preset", 900, ["--stage2.max_steps=360", "--stage2.pretrained_frozen_steps=100"]),
    # stage-2 seeds from the one 900-step stage 1 (seed 1337), as main_360's seeds are from the main job's stage 1
    "preset900s1337_360_lpft100": ("preset", 900, ["--stage2.max_steps=360", "--stage2.pretrained_frozen_steps=100",
                                                   "stage1_seed=1337"]),
    **{f"random_360_{n}": ("random", 0, ["--stage2.max_steps=360", f"n_train={n[1:]}"])
       for n in ("n60", "n120", "n240")},
    **{f"{n}_s1": (n, 300, ["stage1_only"]) for n in ("n60", "n120", "n240")},  # retrieval's data-scaling curve
    "xattn3x_s1": ("xattn3x", 300, ["stage1_only"]), "cls_s1": ("cls", 300, ["stage1_only"]),
    "q8_s1": ("q8", 300, ["stage1_only"]), "q32_s1": ("q32", 300, ["stage1_only"]),
    "preset_s1": ("preset", 300, ["stage1_only"]),
    **{f"{s1}_s1": (s1, 300, ["stage1_only"])
       for s1 in ("lr3e4", "lr1e4", "bert001", "bertfrozen", "div1", "div03", "div1h", "qsim1", "sq1", "sq1_views0",
                  "sq1_cls", "sq1_lr3e4", "sq1_bert1", "sq03")},
    # the cpu preset as shipped: squared query term, llm_proj alone (no gradient for the rest) for 100 steps
    "sq1_360_lpft100": ("sq1", 300, ["--stage2.max_steps=360", "--stage2.pretrained_frozen_steps=100"]),
    "sq03_360_lpft100": ("sq03", 300, ["--stage2.max_steps=360", "--stage2.pretrained_frozen_steps=100"]),
    # lesson-sized runs: stage 1 ~5 min, stage 2 ~5 min on 2 cores without AMX (fp32); stage 2 keeps the preset's
    # shares: llm_proj alone for 28% of the steps, warmup ~4%
    "L32_36_100": ("Lb32", 36, ["--stage2.max_steps=100", "--stage2.pretrained_frozen_steps=28",
                                "--stage2.warmup_steps=4"]),
    "L16_72_200": ("Lb16", 72, ["--stage2.max_steps=200", "--stage2.batch_size=8",
                                "--stage2.pretrained_frozen_steps=56", "--stage2.warmup_steps=8"]),
    "L8_144_200": ("Lb8", 144, ["--stage2.max_steps=200", "--stage2.batch_size=8",
                                "--stage2.pretrained_frozen_steps=56", "--stage2.warmup_steps=8"]),
    "L16q8_80_240": ("Lb16q8", 80, ["--stage2.max_steps=240", "--stage2.batch_size=8",
                                    "--stage2.pretrained_frozen_steps=67", "--stage2.warmup_steps=10"]),
    "L16q8v0_80_240": ("Lb16q8v0", 80, LESSON_S2),
    # the same stage 2 from a random Q-Former: the paper's Figure 5 ablation at the lesson's scale (lesson 6)
    "Lrand8v0_240": ("random", 0, LESSON_S2 + ["--qformer.num_queries=8"]),
    **{f"{k}_s1": (s1, 80, ["stage1_only"]) for k, s1 in (("Lv0", "Lb16q8v0"), ("Lw15", "Lb16q8v0w15"),
                                                          ("Lqs3", "Lb16q8v0qs3"))},
    **{f"{k}_80_240": (s1, 80, LESSON_S2) for k, s1 in (("Lw15", "Lb16q8v0w15"), ("Lqs3", "Lb16q8v0qs3"))},
    "L16_72_400b4": ("Lb16", 72, ["--stage2.max_steps=400", "--stage2.batch_size=4",
                                  "--stage2.pretrained_frozen_steps=111", "--stage2.warmup_steps=16"]),
    # the bridges without a Q-Former (issue 29): pooled patch tokens -> linear layer / LLaVA-1.5's 2-layer MLP, at
    # 360 steps like the preset, each at its own learning rate (LLaVA pretrains its projector at 1e-3 to 2e-3)
    **{f"{k}_lr{lr}": ("none", 0, ["--stage2.max_steps=360", f"--stage2.lr={float(lr.replace('e', 'e-'))}",
                                   f"projector={k}"])
       for k in PROJECTORS for lr in ("3e4", "1e3", "3e3")},
}
OUT = REPO_ROOT / "results" / "recipe-sweep.json"
RUNS = REPO_ROOT / "runs" / "recipe"


def sweep_base():
    """The cpu preset as every row in results/recipe-sweep.json was measured on: the paper's three stage-1 losses and
    all of stage 2 training from step 0 (the preset took query_sim_weight=1 and pretrained_frozen_steps=100 from
    the rows qsim1_* and *_lpft100 here). A variant's own overrides come on top."""
    return apply_overrides(config.cpu(), ["--stage1.query_sim_weight=0", "--stage2.pretrained_frozen_steps=0"])


def split_tweaks(items: list[str]) -> tuple[list[str], dict]:
    """["--a.b=1", "itg_weight=3", "query_ffn_fresh"] -> (["--a.b=1"], {"itg_weight": 3.0, "query_ffn_fresh": True})"""
    over = [i for i in items if i.startswith("--")]
    tweaks = {}
    for i in items:
        if not i.startswith("--"):
            k, _, v = i.partition("=")
            assert k in TWEAK_KEYS, f"unknown tweak {k!r}"
            tweaks[k] = v if k == "projector" else float(v) if v else True
    return over, tweaks


def subset_images(data, n: int, seed: int = 0):
    """Keep the captions of n training images (chosen by a fixed seed, the same for every variant) in place."""
    rows = torch.randperm(len(data.image_paths), generator=torch.Generator().manual_seed(seed))[:n]
    keep = torch.isin(data.row_of_caption, rows)
    data.captions = [c for c, k in zip(data.captions, keep.tolist()) if k]
    data.image_ids, data.row_of_caption = data.image_ids[keep], data.row_of_caption[keep]
    return data


def train_data(cfg, n_train):
    data = ImageTextData.build(cfg, "train", True, torch.device("cpu"))
    return subset_images(data, int(n_train)) if n_train else data


def with_query_div(itc_loss, weight: float, hidden=None):
    """itc_loss, plus weight * the mean cosine between two different queries' ITC features of one image (when
    positive); with `hidden` (a dict a forward hook fills with the query outputs of the last Q-Former pass), of
    their query outputs instead. Logged as part of loss_itc."""
    def loss(image_feats, *args, **kwargs):
        out, sim_i2t, sim_t2i = itc_loss(image_feats, *args, **kwargs)
        q = F.normalize(hidden["q"], dim=-1) if hidden is not None else image_feats
        g = q @ q.transpose(1, 2)  # (B, Q, Q) cosines between unit vectors
        Q = g.shape[1]
        off_diag = (g.sum((1, 2)) - g.diagonal(dim1=1, dim2=2).sum(1)) / (Q * (Q - 1))
        return out + weight * off_diag.mean().clamp_min(0), sim_i2t, sim_t2i
    return loss


def precision_note(cfg) -> str:
    """What "auto" resolved to for a row (rows before this field ran bf16 autocast and a bf16 LLM on an AMX CPU)."""
    return f"stage1 {cfg.stage1.amp}, stage2 {cfg.stage2.amp}, llm {cfg.llm.dtype}; {runtime._cpu_name()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def stage1_run(s1: str, steps: int, seed: int):
    """Train (or reuse) a stage-1 run; returns its directory, model and config."""
    over, tw = split_tweaks(S1[s1])
    c = apply_overrides(sweep_base(), over)
    c.stage1.max_steps, c.stage1.seed, c.stage1.ckpt_every = steps, seed, 10**9
    run_dir = RUNS / "stage1" / f"{s1}-{steps}-s{seed}"
    seed_everything(seed)
    model, tok = build_stage1_model(c)
    if tw.get("query_ffn_fresh"):
        for name, mod in model.qformer.named_modules():
            if ".query_ffn" in name:
                mod.apply(init_bert_weights)
        model.pretrained_names = {n for n in model.pretrained_names if ".query_ffn." not in n}
    if latest_checkpoint(run_dir / "checkpoints") is None:
        w, itg, itc = tw.get("itg_weight", 1.0), losses.itg_loss, losses.itc_loss
        losses.itg_loss = lambda *a, **k: w * itg(*a, **k)  # stage1.py calls losses.itg_loss at every step
        hidden, hook = {}, None
        if tw.get("on_hidden"):  # ITC's pass is the Q-Former call right before itc_loss: keep its query outputs
            Q = c.qformer.num_queries
            hook = model.qformer.register_forward_hook(
                lambda mod, args, out: hidden.update(q=(out[0] if isinstance(out, tuple) else out)[:, :Q]))
        if tw.get("query_div"):
            losses.itc_loss = with_query_div(itc, tw["query_div"], hidden if hook else None)
        try:
            data = train_data(c, tw.get("n_train"))
            if tw.get("cls_only"):
                data.features, data.views = data.features[:, :1], [v[:, :1] for v in data.views]
            t0 = time.time()
            train(c, 1, task=Stage1Task(model, data, tokenizer=tok, max_text_len=c.data.max_text_len), run_dir=run_dir)
            (run_dir / "seconds.txt").write_text(f"{time.time() - t0:.0f}\n")
        finally:
            losses.itg_loss, losses.itc_loss = itg, itc
            if hook:
                hook.remove()
    else:
        load_trainable_state(model, load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors")))
    return run_dir, model, c


@torch.no_grad()
def layer_rows(model, image_tokens):
    """diagnostics.query_cos_by_layer of a Stage1Model on frozen image tokens (B, N, Dv)."""
    model.eval()
    return query_cos_by_layer(model.qformer, model.ln_vision(image_tokens.float()))


@torch.no_grad()
def query_spread(model, image_tokens) -> dict:
    """What the signed query cosine cannot see (+v/-v looks "apart"): the effective rank of each image's query
    outputs (1 = one direction, Q = all different) and their mean |cosine|, eval mode, on val images."""
    model.eval()
    q = F.normalize(model.encode_image(image_tokens.float())[1], dim=-1)
    g = (q @ q.transpose(1, 2)).abs()
    Q = q.shape[1]
    return {"query_erank": round(losses.query_effective_rank(q).item(), 2),
            "query_abs_cos": round(((g.sum((1, 2)) - Q) / (Q * (Q - 1))).mean().item(), 3)}


def untrained_layers(seed: int) -> dict:
    """query_cos_by_layer of the two untrained starts on val: a random Q-Former and the BERT-initialised one."""
    cfg = sweep_base()
    torch.manual_seed(seed)
    bert, tok = build_stage1_model(cfg)
    val = TestSplit(cfg, tok, torch.device("cpu"), split="val")
    torch.manual_seed(seed)
    return {"random": layer_rows(Stage1Model(cfg.qformer, cfg.stage1), val.features[:64]),
            "bert": layer_rows(bert, val.features[:64])}


COLLAPSE = {"random Q-Former (untrained)": ("layers_untrained/s0", "random"),  # results/query-collapse.png
            "BERT-initialised (untrained)": ("layers_untrained/s0", "bert"),
            "paper's losses, 32 queries, seed 1": ("q32_s1/s1", None),
            "paper's losses, 16 queries, seed 2": ("preset_s1/s2", None),
            "+ query similarity of the ITC features, seed 1": ("div1_360_lpft100/s1", None),
            "+ query similarity without dropout (the cpu preset), seed 1": ("qsim1_360_lpft100/s1", None)}


def run(name: str, seed: int) -> dict:
    s1, s1_steps, s2_items = VARIANTS[name]
    device = torch.device("cpu")
    s1_over, s1_tw = split_tweaks(S1.get(s1, []))
    s2_over, s2_tw = split_tweaks(s2_items)
    shared = [o for o in s1_over if o.startswith("--qformer.")]  # the Q-Former's shape carries over to stage 2
    cfg = apply_overrides(sweep_base(), shared + s2_over)
    cfg.stage2.seed, cfg.stage2.ckpt_every = seed, 10**9
    cfg = runtime.resolve_precision(cfg, device, log=False)
    res = {"stage1": s1, "stage1_steps": s1_steps, "stage1_recipe": S1.get(s1, []), "stage2_overrides": s2_items,
           "seed": seed, "precision": precision_note(cfg), "commit": commit()}
    seed_everything(seed)
    untrained, tok = build_stage1_model(cfg)
    val = TestSplit(cfg, tok, device, split="val")
    if s1 == "main":
        s1_dir = MAIN_STAGE1
    elif s1 not in ("random", "bert", "none"):
        s1_dir, s1_model, c1 = stage1_run(s1, s1_steps, int(s2_tw.get("stage1_seed", seed)))
        k = c1.eval.itm_rerank_k
        if s1_tw.get("cls_only"):
            assert s2_tw.get("stage1_only"), "cls_only is a stage-1 diagnosis: stage 2 would still see every token"
            val.features = val.features[:, :1]
        res["retrieval_rerank"], res["retrieval_itc"], _ = stage1_retrieval(s1_model, val, k, device, c1.stage1.amp)
        res["query_cos_by_layer"] = layer_rows(s1_model, val.features[:64])
        res["query_cos"] = res["query_cos_by_layer"][-1]["query_cos"]  # after the last sub-layer: the query outputs
        res.update(query_spread(s1_model, val.features[:64]))
        if (s1_dir / "seconds.txt").exists():
            res["stage1_seconds"] = int((s1_dir / "seconds.txt").read_text())
    if s2_tw.get("stage1_only"):
        return res
    data = train_data(cfg, s2_tw.get("n_train") or s1_tw.get("n_train"))
    seed_everything(seed + 1)
    cfg.stage2.from_stage1 = s1 not in ("random", "bert", "none")
    if s2_tw.get("projector"):  # no Q-Former at all
        llm, llm_tok = load_llm(cfg.llm)
        model = LinearProjectionModel(cfg.qformer, llm, llm_tok, projector=s2_tw["projector"], prompt=cfg.llm.prompt,
                                      max_text_len=cfg.data.max_text_len)
    else:
        model = build_stage2_model(cfg, stage1_dir=s1_dir if cfg.stage2.from_stage1 else None)
    if s1 == "bert":
        model.from_stage1(untrained.state_dict())
    run_dir = RUNS / "stage2" / f"{name}-s{seed}"
    t0 = time.time()
    train(cfg, 2, task=Stage2Task(model, data), run_dir=run_dir)
    res["train_seconds"] = round(time.time() - t0)
    preds = generate_captions(model, val.features, 16, cfg.eval.num_beams, cfg.eval.max_new_tokens, device,
                              cfg.stage2.amp, cfg.eval.no_repeat_ngram_size)
    m = caption_metrics(dict(zip(val.image_ids, preds)), dict(zip(val.image_ids, val.captions)))
    res["val_captions"] = {k: round(v, 2) for k, v in m.items()}
    res["distinct"] = len(set(preds))
    with runtime.autocast(cfg.stage2.amp, device):  # nats the image is worth: loss(other image) - loss(its image)
        res["grounding"] = image_use(model, val.features, [pre_caption(c[0]) for c in val.captions])
    res["examples"] = preds[:4]
    return res


def baselines(seed: int = 1337, n_train: int = 0) -> dict:
    """Nearest-neighbour captions and the linear probe on val (their settings: the main job's)."""
    cfg, device = sweep_base(), torch.device("cpu")
    data = train_data(cfg, n_train)
    _, tok = build_stage1_model(cfg)
    val = TestSplit(cfg, tok, device, split="val")
    caps = _captions_per_image(data)
    rows = [r for r, c in enumerate(caps) if c]  # the images trained on
    nn = nearest_neighbour_captions(pooled_image_features(data.features[rows]), [caps[r] for r in rows],
                                    pooled_image_features(val.features))
    m = caption_metrics(dict(zip(val.image_ids, nn)), dict(zip(val.image_ids, val.captions)))
    return {"nearest_neighbour": {k: round(v, 2) for k, v in m.items()},
            "linear_probe": linear_probe_retrieval(cfg, data, val), "n_train": n_train or len(caps)}


def rerank_on_val(run: str = "main") -> dict:
    """The ITM re-rank depth on val for a stage-1 run: k = 0 (ITC only), 4, 8, 16, 32. "main" and "main_qsim1" both
    read the main job's stage 1: rerank_main/s1337 was measured when the preset had the paper's three losses,
    rerank_main_qsim1/s1337 after it took the query-similarity term (re-run the one that matches runs/coco-mini)."""
    cfg, device = sweep_base(), torch.device("cpu")
    model, tok = build_stage1_model(cfg)
    main = run in ("main", "main_qsim1")
    load_trainable_state(model, load_file(str(latest_checkpoint((MAIN_STAGE1 if main else RUNS / "stage1" / run)
                                                                / "checkpoints") / "model.safetensors")))
    val = TestSplit(cfg, tok, device, split="val")
    res = {}
    for k in (0, 4, 8, 16, 32):
        res[f"k{k}"], _, _ = stage1_retrieval(model, val, k, device, cfg.stage1.amp)
    return res


def _r1(r) -> str:
    return f"{r['TR@1']:.1f} / {r['IR@1']:.1f}" if r else ""


LESSON_RECIPES = (("Lv0", "L16q8v0_80_240", "preset's term weight 1, warmup 5"),
                  ("Lw15", "Lw15_80_240", "weight 1, warmup 15"),
                  ("Lqs3", "Lqs3_80_240", "weight 3, warmup 5"))


def lesson_table() -> str:
    """docs/recipe.md's table of the course's short recipe (lessons 5 and 6: stage 1 80 x 16 with 8 queries and no
    augmented views, stage 2 240 x 8), per seed: the stage-1 queries' effective rank (of 8) and val TR@1 / IR@1,
    then stage 2's val CIDEr, distinct captions (of 70) and grounding gap; the random-start row beside them."""
    d = json.loads(OUT.read_text())
    rows = ["| recipe (val) | seed | query effective rank | TR@1 / IR@1 | CIDEr | distinct captions | grounding gap |",
            "|---|---:|---:|---|---:|---:|---:|"]
    for s1_key, s2_key, label in LESSON_RECIPES + (("", "Lrand8v0_240", "random Q-Former (no stage 1)"),):
        seeds = sorted({int(k.rpartition("/s")[2]) for k in d if k.split("/")[0] in (f"{s1_key}_s1", s2_key)})
        for sd in seeds:
            r1, r2 = d.get(f"{s1_key}_s1/s{sd}", {}), d.get(f"{s2_key}/s{sd}", {})
            r1 = r1 or r2  # the full variant's row holds its stage-1 numbers too
            erank = f"{r1['query_erank']:.2f}" if "query_erank" in r1 else "-"
            ret = _r1(r1["retrieval_itc"]) if "retrieval_itc" in r1 else "-"
            cap = r2.get("val_captions", {}).get("CIDEr")
            rows.append(f"| {label} | {sd} | {erank} | {ret} | {'-' if cap is None else f'{cap:.1f}'} | "
                        f"{r2.get('distinct', '-')} | {r2['grounding']['gap'] if 'grounding' in r2 else '-'} |")
    return "\n".join(rows)


def table() -> str:
    """docs/recipe.md's tables, from results/recipe-sweep.json: stage-2 CIDEr per variant (mean and spread over the
    seeds run), the stage-1 runs' val retrieval (ITC), and the data-scaling curve."""
    d = json.loads(OUT.read_text())
    runs = {}
    for key, r in d.items():
        name, _, seed = key.rpartition("/s")
        runs.setdefault(name, {})[int(seed)] = r

    def per_seed(by_seed: dict) -> str:
        """{seed: value} -> the one value when the seeds agree, else each value with its seed."""
        if len(set(by_seed.values())) > 1:
            return ", ".join(f"{v} (s{sd})" for sd, v in by_seed.items())
        return next(iter(by_seed.values()), "")

    out = ["| variant (val; stage-2 steps: the name's 120 or 360) | stage 1 | stage 2 | CIDEr per seed | CIDEr mean | "
           "BLEU-4 mean | "
           "stage-1 query cosine | stage-1 TR@1 / IR@1 (ITC) |", "|---|---|---|---|---:|---:|---:|---|"]
    for name, seeds in runs.items():
        r0 = next(iter(seeds.values()))
        if "val_captions" not in r0:
            continue
        cider = [seeds[s]["val_captions"]["CIDEr"] for s in sorted(seeds)]
        bleu = [seeds[s]["val_captions"]["BLEU_4"] for s in sorted(seeds)]
        s1 = r0["stage1"] + (f" {' '.join(S1.get(r0['stage1'], []))}" if S1.get(r0["stage1"]) else "") \
            + (f", {r0['stage1_steps']} steps" if r0["stage1_steps"] not in (0, 300) else "")
        s2 = " ".join(o.removeprefix("--stage2.") for o in r0["stage2_overrides"] if "max_steps" not in o) or "-"
        cos = {sd: seeds[sd]["query_cos"] for sd in sorted(seeds) if "query_cos" in seeds[sd]}
        r1 = {sd: _r1(seeds[sd]["retrieval_itc"]) for sd in sorted(seeds) if "retrieval_itc" in seeds[sd]}
        out.append(f"| {name} | {s1} | {s2} | {', '.join(f'{c:.1f} (s{sd})' for c, sd in zip(cider, sorted(seeds)))} | {sum(cider) / len(cider):.1f} | "
                   f"{sum(bleu) / len(bleu):.1f} | {per_seed(cos)} | {per_seed(r1)} |")
    s1_only = {name: dict(seeds) for name, seeds in runs.items()
               if any(r.get("stage2_overrides") == ["stage1_only"] for r in seeds.values())
               and not re.fullmatch(r"n\d+_s1", name)}  # n60_s1 ... go to the data-scaling table
    for name in s1_only:  # the same stage-1 run, scored before a stage 2 (q8_360_lpft100's stage 1 is q8_s1's)
        for seeds in runs.values():
            for sd, r in seeds.items():
                if (r.get("stage1"), r.get("stage1_steps")) == (name.removesuffix("_s1"), 300) and "retrieval_itc" in r \
                        and not any(o.startswith("stage1_seed") for o in r["stage2_overrides"]):
                    s1_only[name].setdefault(sd, r)
    if "preset_s1" in s1_only and "rerank_main" in runs:  # the main job's stage 1 is the preset's recipe, seed 1337
        s1_only["preset_s1"].setdefault(1337, {"retrieval_itc": runs["rerank_main"][1337]["k0"]})
    if s1_only:  # stage-1 recipes scored by their retrieval alone
        out += ["", "| stage 1 only (val, 300 steps) | recipe | TR@1 / IR@1 (ITC) per seed | mean TR@1 / IR@1 | "
                "mean TR@5 / IR@5 | query cosine |", "|---|---|---|---|---|---:|"]
        for name, seeds in s1_only.items():
            rs = [seeds[sd]["retrieval_itc"] for sd in sorted(seeds)]
            mean = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
            cos = sorted({seeds[sd]["query_cos"] for sd in seeds if "query_cos" in seeds[sd]})
            recipe = " ".join(S1[name.removesuffix("_s1")]) or "cpu preset"
            out.append(f"| {name} | {recipe} | {', '.join(f'{_r1(r)} (s{sd})' for r, sd in zip(rs, sorted(seeds)))} | "
                       f"{_r1(mean)} | {mean['TR@5']:.1f} / {mean['IR@5']:.1f} | {', '.join(map(str, cos))} |")
    pts = scaling_points(d)  # the curve of docs/recipe.md's plot (results/data-scaling.png, `--plot`)

    def cell(metric, method, n):
        """The mean over seeds; with several seeds, each seed's value after it."""
        vs = pts.get(metric, {}).get(method, {}).get(n)
        return "not measured" if not vs else f"{sum(vs) / len(vs):.1f}" + \
            (f" ({', '.join(f'{v:.1f}' for v in vs)})" if len(vs) > 1 else "")

    out += ["", "| training images | linear probe TR@1 / IR@1 | Q-Former TR@1 / IR@1 (ITC) | nearest-neighbour CIDEr | "
            "stage 2 from a random Q-Former, CIDEr |", "|---:|---|---|---:|---:|"]
    for n in (60, 120, 240, 480):
        r1 = [f"{cell('TR@1', m, n)} / {cell('IR@1', m, n)}" for m in ("linear probe", "Q-Former")]
        out.append(f"| {n} | {r1[0]} | {r1[1]} | {cell('CIDEr', 'nearest-neighbour caption', n)} | "
                   f"{cell('CIDEr', 'stage 2 from a random Q-Former', n)} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*")
    p.add_argument("--seeds", default="1337")
    p.add_argument("--table", action="store_true", help="print docs/recipe.md's tables from results/recipe-sweep.json")
    p.add_argument("--lesson-table", action="store_true", help="print docs/recipe.md's table of the lessons' recipe")
    p.add_argument("--plot", action="store_true", help="draw results/data-scaling.png and results/query-collapse.png")
    a = p.parse_args()
    if a.lesson_table:
        print(lesson_table())
        return
    if a.table or a.plot:
        if a.table:
            print(table())
        if a.plot:
            png = OUT.with_name("data-scaling.png")
            d = json.loads(OUT.read_text())
            data_scaling(d, out_png=png)
            curves = {label: d[key][sub] if sub else d[key]["query_cos_by_layer"]
                      for label, (key, sub) in COLLAPSE.items() if key in d}
            query_collapse(curves, out_png=png.with_name("query-collapse.png"))
            print(f"wrote {png.relative_to(REPO_ROOT)} and query-collapse.png")
        return
    for name in a.names:
        for seed in map(int, a.seeds.split(",")):
            key = f"{name}/s{seed}"
            if name.startswith("rerank_"):  # rerank_main: the ITM re-rank depth, on val
                res = rerank_on_val(name.removeprefix("rerank_"))
            elif name == "layers_untrained":  # the query cosine per sub-layer of the untrained starts
                res = untrained_layers(seed)
            elif name.startswith("baselines"):  # baselines, baselines_n60, ...
                res = baselines(seed, int(name.partition("_n")[2] or 0))
            else:
                res = run(name, seed)
            print(key, json.dumps(res), flush=True)
            with open(OUT.with_suffix(".lock"), "w") as lock:  # variants may run in parallel processes
                fcntl.flock(lock, fcntl.LOCK_EX)
                results = json.loads(OUT.read_text()) if OUT.exists() else {}  # read late, under the lock
                results[key] = res
                tmp = OUT.with_name(f".{OUT.name}.tmp")
                tmp.write_text(json.dumps(results, indent=1))
                os.replace(tmp, OUT)


if __name__ == "__main__":
    main()
