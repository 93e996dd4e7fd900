#!/usr/bin/env python
"""The first thing to run on a GPU machine: minblip2 at the paper's shapes for a few steps, measured.

    python scripts/gpu_check.py                      # any CUDA machine: ~5-10 min, ~30 GB of GPU memory
    python scripts/gpu_check.py --steps 6 --out gpu_check.json
    python scripts/gpu_check.py --tiny               # tiny shapes on the CPU (what the tests run): ~20 s

It needs no hub, no weight wheels and no dataset: every model has RANDOM weights at the paper's shapes (EVA-CLIP
ViT-g/14 from timm's architecture, a bert-base-sized Q-Former, OPT-2.7B from its published config), the
captions and images are synthetic (random words, random-pixel JPEGs written to a temp folder) and the
tokenizer is a word-level one built on the spot. Speed and memory are real; losses and captions mean nothing.

What it runs, each through `train.train` as a real run would (checkpoints are not written):
  1. stage 1, `paper` (ViT-g fp16, fp16 autocast, micro-batch 105 x 2), image features computed each step,
  2. stage 1, `gpu24` (micro-batch 32 x 8, gradient checkpointing),
  3. stage 2, `paper` with OPT-2.7B's shapes in fp16 (micro-batch 120; a random Q-Former, no stage 1 needed),
  4. beam search (5 beams, 10 new tokens, 8 images) with that stage-2 model,
  5. stage 1, `paper` with cached image features,
  6. issue 27's paths: a checkpoint on the GPU loaded with weights_only, the dropout-free query pass checkpointed,
and prints a table -- step time (median, first step left out), samples/s, peak memory against the dry run's
estimate (`minblip2/tools/dryrun.py`) -- and writes it as JSON. lessons/08_scaling_up.ipynb shows what an H100 gave.
Without a CUDA GPU (and without --tiny) it says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's minblip2, whatever is installed

GiB = 2**30
WORDS = [f"w{i}" for i in range(2000)] + ["a", "photo", "of"]  # the vocabulary of the synthetic captions


# ----------------------------------------------------------------------------- synthetic data, tokenizer


def synthetic_coco(root: Path, num_images: int, px: int, captions_per_image: int = 5, seed: int = 0) -> Path:
    """A COCO-format folder (captions.jsonl + images/, split "train") of random-pixel JPEGs and random captions
    of 8-40 words: long enough that a batch's longest fills data.max_text_len, as the estimate assumes."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(num_images):
            Image.fromarray(gen.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
            caps = [" ".join(rng.choices(WORDS[:2000], k=rng.randint(8, 40))) for _ in range(captions_per_image)]
            f.write(json.dumps({"image_id": i, "file": f"images/{i}.jpg", "split": "train", "captions": caps}) + "\n")
    return root


def word_tokenizer():
    """A word-level tokenizer over WORDS, built offline: [CLS] ... [SEP] like BERT's (the Q-Former's), and also the
    LLM's (bos [CLS], eos [SEP], pad [PAD]). Ids 0-3 are the special tokens, the words follow."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", bos_token="[CLS]",
                                                eos_token="[SEP]")


# ----------------------------------------------------------------------------- configurations


def configs(tiny: bool, root: Path, steps: int) -> dict:
    """name -> (Config, stage) for the runs; the paper's shapes with random weights, or tiny ones for the CPU."""
    from minblip2.config import LLMConfig, QFormerConfig, VisionConfig, gpu24, paper

    def base(preset):
        c = preset()
        c.vision.weights, c.qformer.bert_weights, c.llm.weights = "random", "random", "random"
        c.data.root, c.device = str(root), "cpu" if tiny else "cuda"
        c.stage2.from_stage1 = False
        if tiny:
            c.vision = VisionConfig(name="vit_tiny_patch16_224", weights="random", img_size=32, dtype="float32")
            c.qformer = QFormerConfig(bert_weights="random", hidden_size=32, num_layers=2, num_heads=4,
                                      intermediate_size=64, num_queries=4, vision_width=192, embed_dim=16,
                                      max_position_embeddings=64,
                                      gradient_checkpointing=c.qformer.gradient_checkpointing)
            c.llm = LLMConfig(name="tiny-opt", weights="random", dtype="float32")
            c.data.max_text_len = 16
            for t in (c.stage1, c.stage2):
                t.amp = "bf16"
                t.batch_size, t.grad_accum = (4, 4) if c.qformer.gradient_checkpointing else (8, 2)
        for t in (c.stage1, c.stage2):
            t.max_steps, t.warmup_steps, t.log_every, t.ckpt_every = steps, 1, 1, 10**9
        return c

    runs = {}  # the runs that compute image features first: they share one frozen encoder
    runs["stage 1, features computed each step"] = (base(paper), 1)
    runs["stage 1, gpu24 (checkpointing)"] = (base(gpu24), 1)
    c = base(paper)
    c.stage2.grad_accum = 1  # as measured on the H100
    runs["stage 2, OPT-2.7B shapes" if not tiny else "stage 2, tiny OPT"] = (c, 2)
    c = base(paper)
    c.stage1.cache_features = True
    runs["stage 1, cached features"] = (c, 1)
    return runs


def build_llm(cfg, tiny: bool, vocab_size: int, device):
    """The frozen LLM with random weights: OPT-2.7B from its published config (no hub), or a tiny OPT."""
    import transformers

    from minblip2.backbones import build_llm_from_config
    from minblip2.tools.dryrun import PUBLISHED_LLM_CONFIGS

    if tiny:
        config = transformers.OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                        num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                        pad_token_id=0, bos_token_id=2, eos_token_id=3)
    else:
        kw = dict(PUBLISHED_LLM_CONFIGS[cfg.llm.name])
        config = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        return build_llm_from_config(config).to(getattr(torch, cfg.llm.dtype))


# ----------------------------------------------------------------------------- measuring


def step_times(run_dir: Path) -> list[float]:
    """Seconds per step from log.csv's running clock (the step's optimizer update and all-reduce included)."""
    with open(run_dir / "log.csv") as f:
        t = [float(r["time"]) for r in csv.DictReader(f)]
    return [b - a for a, b in zip([0.0] + t, t)]


def measure(fn, device) -> tuple[object, int]:
    """(fn's result, peak bytes of tensor memory while it ran)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device)
    sys.path.insert(0, str(REPO / "bench"))
    from common import peak_step_memory  # the CPU allocation profiler (a running total of allocated bytes)

    box = {}
    peak = peak_step_memory(lambda: box.setdefault("result", fn()), device)
    return box.get("result"), peak


def run_all(tiny: bool, steps: int, work: Path) -> dict:
    import minblip2.train as train_mod
    from minblip2 import dist, runtime
    from minblip2.tools.dryrun import estimate_memory
    from minblip2.stage1 import Stage1Model
    from minblip2.stage2 import Stage2Model
    from minblip2.tasks import ImageTextData, Stage1Task, Stage2Task

    device = torch.device("cpu" if tiny else "cuda")
    train_mod.save_checkpoint = lambda *a, **k: None  # a speed check: no multi-GB optimizer states on disk
    root = synthetic_coco(work / "data", num_images=16 if tiny else 64, px=64 if tiny else 256)
    tokenizer = word_tokenizer()
    vocab = len(WORDS) + 4
    results, data, beam = [], {}, None
    for name, (cfg, stage) in configs(tiny, root, steps).items():
        t = cfg.stage1 if stage == 1 else cfg.stage2
        print(f"== {name}: micro-batch {t.batch_size} x {t.grad_accum}, amp {t.amp}, "
              f"checkpointing {cfg.qformer.gradient_checkpointing}", flush=True)
        if t.cache_features not in data:  # one frozen encoder at a time on the device
            data.clear()
            gc.collect()
            data[t.cache_features] = ImageTextData.build(cfg, "train", t.cache_features, device)
        d = data[t.cache_features]
        torch.manual_seed(0)
        if stage == 1:
            model = Stage1Model(cfg.qformer, cfg.stage1)
            task = Stage1Task(model, d, tokenizer=tokenizer, max_text_len=cfg.data.max_text_len)
        else:
            llm = build_llm(cfg, tiny, vocab, device)
            model = Stage2Model(cfg.qformer, llm, tokenizer, prompt=cfg.llm.prompt, max_text_len=cfg.data.max_text_len)
            task = Stage2Task(model, d)
        run_dir = work / name.replace(" ", "_").replace(",", "")
        _, peak = measure(lambda: train_mod.train(cfg, stage, task, resume=False, progress=False, run_dir=run_dir),
                          device)
        built = {"image_encoder": d.encoder, "model": model, "llm": getattr(model, "llm", None)}
        est = estimate_memory(cfg, stage, built, t.batch_size, device_type=device.type)["total"]
        if device.type == "cpu":  # the profiler saw only what train() allocated: add the encoder built before it
            peak += sum(p.numel() * p.element_size() for p in d.encoder.parameters())
            if stage == 2:  # ... and the LLM, built before too
                peak += sum(p.numel() * p.element_size() for p in model.llm.parameters())
        secs = step_times(run_dir)
        median = statistics.median(secs[1:] if len(secs) > 1 else secs)
        samples = t.batch_size * t.grad_accum * dist.world_size()
        results.append({"run": name, "stage": stage, "micro_batch": t.batch_size, "grad_accum": t.grad_accum,
                        "amp": t.amp, "checkpointing": cfg.qformer.gradient_checkpointing,
                        "features": "cached" if t.cache_features else "computed each step",
                        "step_s_median": round(median, 4), "step_s_all": [round(s, 4) for s in secs],
                        "samples_per_s": round(samples / median, 2), "peak_gib": round(peak / GiB, 3),
                        "estimate_gib": round(est / GiB, 3), "estimate_over_peak": round(est / peak, 3)})
        print(f"   {median:.3f} s/step, {samples / median:.1f} samples/s, peak {peak / GiB:.2f} GiB, "
              f"dry-run estimate {est / GiB:.2f} GiB", flush=True)
        if stage == 2:  # beam search with the stage-2 model, as run.py captions
            model.eval()
            emb = d.batch(torch.arange(8), device)[0]
            with runtime.autocast(t.amp, device):
                model.generate(emb[:2], num_beams=5, max_new_tokens=10)  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.time()
                caps = model.generate(emb, num_beams=5, max_new_tokens=10, min_new_tokens=10)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            beam = {"images": 8, "beams": 5, "new_tokens": 10, "seconds": round(time.time() - t0, 3),
                    "example": caps[0][:60]}
            print(f"   beam search: {beam['seconds']:.2f} s", flush=True)
        del model, task, built
    data.clear()
    return {"runs": results, "beam_search": beam, "data_path": data_path(tiny, root, steps, tokenizer, device),
            "scaleout": scaleout_checks(tiny, device, work)}


def scaleout_checks(tiny: bool, device, work: Path) -> dict:
    """What issue 27 changed on paths one GPU reaches outside train()'s timed runs above (which already take ITM's
    negatives through Stage1Model._negative_images and beam search through the line-break end tokens):
    - a checkpoint of a model and fused AdamW on the device, with the device's RNG state, loads with
      weights_only=True (checkpoint.py) and restores that RNG;
    - stage 1's dropout-free query pass (query_sim_weight > 0) keeps gradient checkpointing on: peak memory of that
      pass and its backward at gpu24's shapes (micro-batch 32), checkpointing on and off."""
    from minblip2 import runtime
    from minblip2.checkpoint import load_checkpoint, save_checkpoint
    from minblip2.config import Stage1Config, gpu24
    from minblip2.stage1 import Stage1Model

    cfg = gpu24()
    q = cfg.qformer
    if tiny:
        q.hidden_size, q.num_layers, q.num_heads, q.intermediate_size = 32, 2, 4, 64
        q.num_queries, q.vision_width = 4, 24
    B, N = (4, 9) if tiny else (cfg.stage1.batch_size, 257)
    amp = "bf16" if tiny else cfg.stage1.amp
    out = {}

    torch.manual_seed(0)
    model = Stage1Model(q, Stage1Config(query_sim_weight=1.0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.randn(2, N, q.vision_width, device=device), torch.randint(0, 100, (2, 8), device=device),
          torch.ones(2, 8, dtype=torch.long, device=device))["loss"].backward()
    opt.step()
    path = save_checkpoint(work / "ckpt", 1, model, opt, None, cfg)
    expected = torch.rand(3, device=device)
    torch.manual_seed(1)
    load_checkpoint(path, model, opt)  # weights_only=True inside
    out["checkpoint_rng_restored"] = bool(torch.equal(torch.rand(3, device=device), expected))
    print(f"   checkpoint on {device.type}: weights_only load, RNG restored: {out['checkpoint_rng_restored']}",
          flush=True)

    img = torch.randn(B, N, q.vision_width, device=device)
    for ckpt in (False, True):
        q.gradient_checkpointing = ckpt
        torch.manual_seed(0)
        model = Stage1Model(q, Stage1Config(query_sim_weight=1.0)).to(device).train()

        def dropout_free_pass():
            with runtime.autocast(amp, device):
                image_kv = model.qformer.image_kv(model.ln_vision(img))
                loss = model._queries_without_dropout(image_kv=image_kv).float().pow(2).mean()
            loss.backward()
        _, peak = measure(dropout_free_pass, device)
        out[f"dropout_free_pass_peak_bytes_checkpointing_{'on' if ckpt else 'off'}"] = int(peak)
        del model
    off, on = (out[f"dropout_free_pass_peak_bytes_checkpointing_{k}"] / GiB for k in ("off", "on"))
    print(f"   dropout-free query pass, micro-batch {B}: peak {off:.3f} GiB without checkpointing, {on:.3f} GiB with",
          flush=True)
    return out


def data_path(tiny: bool, root: Path, steps: int, tokenizer, device) -> dict:
    """bench/data_path.py on this device: train()'s DataLoader loop vs the same steps on batches already on the
    device, for cached and computed features (stage 1, the paper's micro-batch). Target: ratio >= 0.8 cached."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from data_path import bench
    from minblip2.stage1 import Stage1Model

    cfg, _ = configs(tiny, root, steps)["stage 1, cached features"]
    torch.manual_seed(0)
    res = bench(cfg, device, steps=2, rounds=3, quiet=True, model=Stage1Model(cfg.qformer, cfg.stage1),
                tokenizer=tokenizer)
    ratios = {kind: {k: round(v, 3) for k, v in r["ratio"].items()} for kind, r in res.items() if isinstance(r, dict) and "ratio" in r}
    print(f"   data path (loop / pre-staged samples/s): {ratios}", flush=True)
    return ratios


def table(report: dict) -> str:
    rows = ["| run | micro-batch x accum | step (median) | samples/s | peak memory | dry-run estimate | estimate / peak |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        rows.append(f"| {r['run']} | {r['micro_batch']} x {r['grad_accum']} | {r['step_s_median']:.3f} s | "
                    f"{r['samples_per_s']:.1f} | {r['peak_gib']:.2f} GiB | {r['estimate_gib']:.2f} GiB | "
                    f"{r['estimate_over_peak']:.2f} |")
    b = report.get("beam_search")
    if b:
        rows.append(f"\nbeam search ({b['beams']} beams, {b['new_tokens']} new tokens, {b['images']} images): "
                    f"{b['seconds']:.2f} s")
    for kind, r in report.get("data_path", {}).items():
        rows.append(f"data path, {kind} features: the training loop runs at {r['median']:.2f} ({r['q1']:.2f}-"
                    f"{r['q3']:.2f}) of the rate on batches already on the device (target >= 0.8 for cached)")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 4; --tiny 3)")
    p.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine, nothing to measure. (`python scripts/gpu_check.py --tiny` "
              "runs the same checks at tiny shapes on the CPU.)")
        return 0
    steps = args.steps or (3 if args.tiny else 4)
    with tempfile.TemporaryDirectory(prefix="minblip2-gpu-check-") as tmp:
        work = Path(tmp)
        # caches (image features, the parsed captions) go to the temp folder, never to the user's
        os.environ["MINBLIP2_CACHE"] = str(work / "cache")
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
        os.environ.setdefault("TQDM_DISABLE", "1")
        t0 = time.time()
        report = run_all(args.tiny, steps, work)
    device = "CPU (--tiny)" if args.tiny else torch.cuda.get_device_name(0)
    report = {"device": device, "torch": torch.__version__, "tiny": args.tiny, "steps": steps,
              "seconds": round(time.time() - t0, 1), **report}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{device}, torch {torch.__version__}, random weights ({'tiny shapes' if args.tiny else 'paper shapes'})\n")
    print(table(report))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
