"""Tiny made-up image folders and a tiny image-encoder config for the data-pipeline tests (tests/test_data_pipeline.py).

As a script it trains stage 1 on such a folder, or caches its features (the 2-process tests under torchrun):

    torchrun --standalone --nproc_per_node=2 tests/data_worker.py RUN_DIR SOURCE [--section.field=value ...]
    torchrun --standalone --nproc_per_node=2 tests/data_worker.py cache CACHE_DIR SOURCE VIEW [per_rank]
    torchrun --standalone --nproc_per_node=2 tests/data_worker.py stream OUT SHARDS
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image

from minblip2.config import VisionConfig

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "black": (10, 10, 10),
          "white": (245, 245, 245), "yellow": (230, 220, 40)}


def make_folder(root, n: int = 12, bad=(), fmt: str = "jsonl", captions_per_image: int = 1) -> Path:
    """n drawn images (a colored square on gray, 24-40 px) with made-up captions; the indices in `bad` are
    written as truncated files. fmt: "jsonl" (metadata.jsonl), "csv" (metadata.csv)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        img = Image.new("RGB", (24 + i % 17, 40 - i % 13), (128, 128, 128))
        img.paste(COLORS[color], (4, 4, 16, 16 + i % 5))
        file = f"images/{i:04d}.png"
        img.save(root / file)
        if i in bad:
            (root / file).write_bytes((root / file).read_bytes()[:40])  # a download that stopped early
        caps = [f"a {color} square number {i}", f"the square is {color}"][:captions_per_image]
        rows.append({"file_name": file, "caption": caps[0] if captions_per_image == 1 else caps, "image_id": i})
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["file_name,caption,image_id"] + [f"{r['file_name']},{r['caption']},{r['image_id']}" for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def tiny_pipeline_config(source, **stage1):
    """ddp_worker.tiny_config's Q-Former over a random timm vit_tiny at 32 px (5 tokens of width 192), training on
    the images of `source` (data.load_pairs) through the real data path."""
    from ddp_worker import tiny_config

    cfg = tiny_config(**{"batch_size": 4, "max_steps": 3, "cache_features": False, **stage1})
    cfg.vision = VisionConfig(name="vit_tiny_patch16_224", weights="random", img_size=32)
    cfg.qformer.vision_width = 192
    cfg.data.source = str(source)
    cfg.data.max_text_len = 16
    cfg.data.num_workers = 0
    return cfg


class PixelEncoder(torch.nn.Module):
    """A stand-in frozen encoder whose "tokens" are the pixels: (B, 3, 16, 16) -> (B, 256, 3)."""

    img_size, mean, std = 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


def main(argv):
    from minblip2 import dist
    from minblip2.config import apply_overrides
    from minblip2.train import train

    torch.set_num_threads(1)
    if argv[0] == "cache":  # cache CACHE_DIR SOURCE VIEW [per_rank]: every process encodes its share into one file
        from minblip2.data import load_pairs
        from minblip2.features import cached_features

        dist.setup("cpu")
        images = load_pairs(argv[2]).images
        # per_rank: CACHE_DIR/rank<r>, a directory no other process sees (as node-local disks on many nodes)
        cache_dir = Path(argv[1], f"rank{dist.rank()}") if argv[4:] == ["per_rank"] else argv[1]
        try:
            cached_features(PixelEncoder(), VisionConfig(name="pixels", img_size=16), images, cache_dir=cache_dir,
                            view=int(argv[3]), batch_size=3, progress=False, num_workers=1)
        finally:
            dist.cleanup()
        return
    if argv[0] == "stream":  # stream OUT SHARDS: 4 steps straight, and 2 steps + a resume to 4; samples per rank
        from minblip2.tasks import build_task

        out, shards = Path(argv[1]), argv[2]
        cfg = tiny_pipeline_config(shards, max_steps=4, ckpt_every=2)
        cfg.data.streaming, cfg.data.shuffle_buffer = True, 50
        device = dist.setup("cpu")

        def run(tag, run_dir, **kw):
            task = build_task(cfg, 1, device)
            seen, loss = [], task.loss

            def recording_loss(model, batch, dev, **kw):
                seen.append([f"{i}:{c}" for i, c in zip(batch["image_id"].tolist(), batch["caption"])])
                return loss(model, batch, dev, **kw)
            task.loss = recording_loss
            train(cfg, 1, task, progress=False, run_dir=out / run_dir, **kw)
            (out / f"{tag}-rank{dist.rank()}.json").write_text(json.dumps(seen))
        try:
            run("full", "full")
            run("part", "part", stop_at=2)
            run("resumed", "part")
        finally:
            dist.cleanup()
        return
    run_dir, source, overrides = argv[0], argv[1], argv[2:]
    cfg = apply_overrides(tiny_pipeline_config(source), overrides)
    try:
        train(cfg, 1, progress=False, run_dir=run_dir)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1:])
