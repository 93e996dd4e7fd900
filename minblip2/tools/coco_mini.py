"""The main job: stage 1 -> stage 2 -> evaluation on coco-mini, with the baselines, in one command.

    minblip2-coco-mini                       # offline defaults (preset "cpu"): what `make run` runs
    minblip2-coco-mini --ablations           # what each piece is worth (~30 min): `make ablations`
    minblip2-coco-mini --stage1.max_steps=50 --stage2.max_steps=20 --out_dir=runs/quick --results=''
(`minblip2-coco-mini` is `python -m minblip2.tools.coco_mini`.)

The main job trains the headline model (stage1/, stage2/) and scores it against the two baselines that need no
training of ours: the linear probe (retrieval) and the nearest-neighbour caption. It writes metrics.json,
captions.png and retrieval.png to <out_dir> and copies the metrics to --results (default results/coco-mini.json).
--ablations trains, at the same stage-2 steps: stage 1 without ITG (stage1_no_itg/), stage 2 without stage 1 from a
random (stage2_no_stage1/) and from a BERT-initialised Q-Former (stage2_no_stage1_bert/), and a linear projection
into the LLM (stage2_linear_projection/); metrics in <out_dir>/ablations.json and results/coco-mini-ablations.json.
Every training stage writes checkpoints, log.csv and losses.png. Interrupted? Run it again: every training stage
resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from .. import dist, runtime
from ..backbones import load_image_encoder
from .baselines import (LinearProjectionModel, frozen_text_encoder, nearest_neighbour_captions, pooled_image_features,
                        pooled_text_features, probe_training_pairs, train_linear_probe)
from ..caption_eval import caption_metrics
from ..config import REPO_ROOT, Config, config_from_command_line
from ..data import load_coco, tokenize
from ..features import cached_features
from .plots import caption_grid, retrieval_examples
from ..retrieval import recall_at_k, retrieval_scores
from ..tasks import ImageTextData, Stage1Task, Stage2Task, build_stage1_model, build_stage2_model
from ..train import seed_everything, train


def variant(cfg: Config, **changes) -> Config:
    """A copy of cfg with changes like stage1__losses=(...)."""
    c = copy.deepcopy(cfg)
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(c, section), name, value)
    return c


class TestSplit:
    """The test split: unique images (frozen tokens) and all their captions, tokenised for the Q-Former."""

    def __init__(self, cfg: Config, tokenizer, device, split: str = "test"):
        recs = load_coco(cfg.data.root, split, per="image")
        self.image_ids = list(recs["image_id"])
        self.image_paths = list(recs["image_path"])
        self.captions = list(recs["captions"])
        encoder = load_image_encoder(cfg.vision).to(device)
        self.features = cached_features(encoder, cfg.vision, self.image_paths, device=device,
                                        amp=runtime.resolve_amp("auto", device))
        self.flat_captions = [c for caps in self.captions for c in caps]
        self.text_to_image = torch.tensor([i for i, caps in enumerate(self.captions) for _ in caps])
        tok = tokenize(tokenizer, self.flat_captions, cfg.data.max_text_len)
        self.input_ids, self.text_mask = tok["input_ids"], tok["attention_mask"]


def stage1_retrieval(model, test: TestSplit, k: int, device, amp: str):
    i2t, t2i, itc = retrieval_scores(model, test.features, test.input_ids, test.text_mask, k=k,
                                     device=device, amp=amp, progress=True)
    return recall_at_k(i2t, t2i, test.text_to_image), recall_at_k(itc, itc.t(), test.text_to_image), t2i


def linear_probe_retrieval(cfg: Config, train_data: ImageTextData, test: TestSplit, pool=pooled_image_features):
    """The CLIP-style baseline: a linear probe on `pool`ed frozen image tokens ([CLS] by default) and the frozen
    text encoder the Q-Former started from, trained on stage 1's pairs, views, loss, steps and lr; test R@K."""
    bert, tokenizer = frozen_text_encoder(cfg.qformer)
    img_x, txt_x = probe_training_pairs(train_data, bert, tokenizer, pool)
    s1 = cfg.stage1
    probe, _ = train_linear_probe(img_x, txt_x, steps=s1.max_steps, batch_size=s1.batch_size, lr=s1.lr, seed=s1.seed)
    with torch.no_grad():
        sim = (probe.encode_image(pool(test.features)).squeeze(1)
               @ probe.encode_text(pooled_text_features(bert, tokenizer, test.flat_captions)).t())
    return recall_at_k(sim, sim.t(), test.text_to_image)


@torch.no_grad()
def generate_captions(model, features, batch_size: int, num_beams: int, max_new_tokens: int, device, amp: str,
                      no_repeat_ngram_size: int = 0):
    model.eval()
    out = []
    for i in runtime.progress_bar(range(0, len(features), batch_size), desc="captions", leave=False):
        with runtime.autocast(amp, device):
            out += model.generate(features[i:i + batch_size].to(device).float(), num_beams=num_beams,
                                  max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="minblip2-coco-mini", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--ablations", action="store_true",
                   help="train the ablations (no ITG; stage 2 without stage 1, from a random and from a "
                        "BERT-initialised Q-Former; a linear projection) instead of the headline model")
    p.add_argument("--results", default=None, help="where to copy the metrics ('' = don't; default "
                   "results/coco-mini.json, with --ablations results/coco-mini-ablations.json)")
    args, overrides = p.parse_known_args(argv)
    cfg = config_from_command_line(args.preset, overrides)  # a mistake: one line, exit status 2
    if args.results is None:
        args.results = str(REPO_ROOT / "results" / ("coco-mini-ablations.json" if args.ablations else "coco-mini.json"))
    device = dist.setup(cfg.device)
    cfg = runtime.resolve_precision(cfg, device)  # "auto" -> this machine's choice, printed and kept in metrics.json
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / ("ablations.json" if args.ablations else "metrics.json")
    command = "minblip2-coco-mini" + (" --ablations" if args.ablations else "")
    timings, t_start = {}, time.time()

    def tick(name, t0):
        timings[name] = round(time.time() - t0, 1)
        print(f"[{name}] {timings[name]} s")

    def save(final=False):
        _save(metrics_file, results, cfg, timings, command, final)

    # ---------------------------------------------------------------- stage 1: the Q-Former (ablation: without ITG)
    t0 = time.time()
    train_data = ImageTextData.build(cfg, "train", True, device)
    s1 = {}
    stage1_runs = ([("qformer_no_itg", "stage1_no_itg", variant(cfg, stage1__losses=("itc", "itm")))]
                   if args.ablations else [("qformer", "stage1", cfg)])
    for name, sub, c in stage1_runs:
        seed_everything(c.stage1.seed)  # each model's initial weights depend on the config's seed alone
        model, tokenizer = build_stage1_model(c)
        task = Stage1Task(model, train_data, tokenizer=tokenizer, max_text_len=c.data.max_text_len)
        train(c, 1, task=task, run_dir=out / sub)
        s1[name] = model
        tick(f"train_{name}", t0)
        t0 = time.time()

    test = TestSplit(cfg, tokenizer, device)
    results = {"stage1": {}, "stage2": {}}
    k, amp = cfg.eval.itm_rerank_k, cfg.stage1.amp  # k = 0: ranked by ITC alone (the cpu preset: chosen on val)
    for name, model in s1.items():
        results["stage1"][name], itc_only, t2i = stage1_retrieval(model, test, k, device, amp)
    if not args.ablations and k:
        results["stage1"]["qformer_itc_only"] = itc_only
    # (with k = 0 no ITM re-ranking runs: it did not help on val, scripts/recipe_sweep.py rerank_main*, and scoring
    # it here for the record cost most of this step's time)
    tick("eval_retrieval", t0)

    # ---------------------------------------------------------------- linear probe (same data, same loss)
    if not args.ablations:
        t0 = time.time()
        results["stage1"]["linear_probe"] = linear_probe_retrieval(cfg, train_data, test)
        tick("linear_probe", t0)
    save()

    # ---------------------------------------------------------------- stage 2: the ways into the LLM
    # the ablations train as many stage-2 steps as the headline model (the paper's Figure 5 at one point)
    no_stage1 = variant(cfg, stage2__from_stage1=False)
    stage2_runs = ([("no_stage1", "stage2_no_stage1", no_stage1),
                    # all its weights train from step 0 (bert_360 in scripts/recipe_sweep.py: the setting measured
                    # on val); freezing BERT's weights for the first steps is stage 1's warm start, not BERT's
                    ("no_stage1_bert", "stage2_no_stage1_bert", variant(no_stage1, stage2__pretrained_frozen_steps=0)),
                    ("linear_projection", "stage2_linear_projection", no_stage1)]
                   if args.ablations else [("minblip2", "stage2", cfg)])
    s2 = {}
    for name, sub, c in stage2_runs:
        t0 = time.time()
        seed_everything(c.stage2.seed)  # each model's initial weights depend on the config's seed alone
        if name == "linear_projection":
            from ..backbones import load_llm
            llm, tok = load_llm(c.llm)
            model = LinearProjectionModel(c.qformer, llm, tok, prompt=c.llm.prompt, max_text_len=c.data.max_text_len)
        else:
            model = build_stage2_model(c, stage1_dir=out / "stage1")
        if name == "no_stage1_bert":  # how stage 1 starts, and LAVIS's stage 2 without a stage-1 checkpoint:
            model.from_stage1(build_stage1_model(c)[0].state_dict())  # BERT's weights, fresh queries/cross-attention
        train(c, 2, task=Stage2Task(model, train_data), run_dir=out / sub)
        tick(f"train_{name}", t0)
        t0 = time.time()
        preds = generate_captions(model, test.features, 16, c.eval.num_beams, c.eval.max_new_tokens,
                                  device, c.stage2.amp, c.eval.no_repeat_ngram_size)
        s2[name] = preds
        results["stage2"][name] = caption_metrics(dict(zip(test.image_ids, preds)),
                                                  dict(zip(test.image_ids, test.captions)))
        tick(f"captions_{name}", t0)
        del model
        save()

    nn_preds = nearest_neighbour_captions(pooled_image_features(train_data.features),
                                          _captions_per_image(train_data), pooled_image_features(test.features))
    results["stage2"]["nearest_neighbour"] = caption_metrics(dict(zip(test.image_ids, nn_preds)),
                                                             dict(zip(test.image_ids, test.captions)))

    # ---------------------------------------------------------------- pictures (the headline model's)
    if not args.ablations:
        show = list(range(0, len(test.image_ids), max(1, len(test.image_ids) // 12)))[:12]
        caption_grid([test.image_paths[i] for i in show], [s2["minblip2"][i] for i in show],
                     [test.captions[i][0] for i in show], out / "captions.png")
        queries = [0, 7, 33, 101, 402]
        queries = [q for q in queries if q < len(test.flat_captions)][:4]
        ranked = [t2i[q].argsort(descending=True)[:5].tolist() for q in queries]
        retrieval_examples([test.flat_captions[q] for q in queries], [[test.image_paths[i] for i in r] for r in ranked],
                           [[i == int(test.text_to_image[q]) for i in r] for q, r in zip(queries, ranked)],
                           out / "retrieval.png")
    timings["total"] = round(time.time() - t_start, 1)
    save(final=True)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(metrics_file.read_text())
    print(json.dumps(results, indent=2))


def _captions_per_image(data: ImageTextData) -> list[list[str]]:
    caps = [[] for _ in data.image_paths]
    for c, r in zip(data.captions, data.row_of_caption.tolist()):
        caps[r].append(c)
    return caps


def _save(path: Path, results, cfg: Config, timings, command: str, final: bool = False):
    doc = {**results, "complete": final, "timings_s": timings, "command": command, "config": cfg.to_dict()}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
