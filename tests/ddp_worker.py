"""A tiny stage-1 task on synthetic features, shared by tests/test_train.py and tests/test_ddp.py.

As a script it trains that task (for the DDP test under torchrun, and the kill test as a subprocess):

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py RUN_DIR --batch_size=4 --max_steps=4 --stop_at=3
    python tests/ddp_worker.py RUN_DIR --ckpt_every=1 --max_steps=30
"""
from __future__ import annotations

import sys

import torch

from minblip2.config import Config, QFormerConfig, Stage1Config

COLORS = ["red", "green", "blue", "black", "white"]
SHAPES = ["square", "circle", "triangle", "star"]


def tiny_config(**stage1) -> Config:
    """A 2-layer, 32-wide Q-Former with 4 queries over 24-dim image tokens; the recipe overridable."""
    cfg = Config()
    cfg.device = "cpu"
    cfg.qformer = QFormerConfig(bert_weights="random", hidden_size=32, num_layers=2, num_heads=4,
                                intermediate_size=64, num_queries=4, cross_attention_freq=2, vision_width=24,
                                embed_dim=16, vocab_size=30523, dec_token_id=30522, max_position_embeddings=40)
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=8, batch_size=8, amp="none", ckpt_every=2,
              log_every=1, seed=0)
    kw.update(stage1)
    cfg.stage1 = Stage1Config(**kw)
    return cfg


def synthetic_data(num_images: int = 40, tokens: int = 9, dim: int = 24, seed: int = 0):
    """40 "images" (random 9x24 tokens), 2 captions each ("a red square", "the square is red"), so 80 pairs.

    The two captions differ in length (5 and 6 tokens with [CLS]/[SEP]), so batches split over processes
    hold different numbers of ITG target tokens -- what the DDP test needs to catch a per-process token mean.
    """
    from minblip2.tasks import ImageTextData

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(num_images, tokens, dim, generator=g)
    caps, rows = [], []
    for i in range(num_images):
        c, s = COLORS[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
        caps += [f"a {c} {s}", f"the {s} is {c}"]
        rows += [i, i]
    rows = torch.tensor(rows)
    return ImageTextData(captions=caps, image_ids=rows + 1000, image_paths=[f"img{i}.jpg" for i in range(num_images)],
                         row_of_caption=rows, encoder=torch.nn.Identity(), features=feats)


def tiny_task(cfg: Config, model_seed: int | None = None, init_scale: float = 5.0):
    """The StageTask train() runs: a Stage1Model with random weights (seeded by model_seed, default the
    recipe's seed), the synthetic data, the offline BERT tokenizer (+ [DEC])."""
    from minblip2.backbones import load_bert
    from minblip2.stage1 import Stage1Model
    from minblip2.tasks import StageTask

    torch.manual_seed(cfg.stage1.seed if model_seed is None else model_seed)  # as build_task: after seeding
    model = Stage1Model(cfg.qformer, cfg.stage1)
    # BERT's std-0.02 init leaves a tiny random Q-Former's queries almost blind to the image: every image gets
    # ~the same features, ITC sits at ln(B) and its gradient is a cancellation of large terms with ~0.5%
    # float32 noise, which Adam's normalised step turns into ~1e-5 weight noise. std 0.1 is well conditioned.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(init_scale)
    tokenizer = load_bert(cfg.qformer)[1]
    unused = set(cfg.stage1.losses) != {"itc", "itm", "itg"}
    return StageTask(model, synthetic_data(), tokenizer, max_text_len=16, has_unused_parameters=unused, stage=1)


def main(argv):
    """RUN_DIR [--field=value ...] (Stage1Config fields, plus --stop_at, --threads, --qformer.dropout)."""
    import ast

    from minblip2 import dist
    from minblip2.train import train

    run_dir, kw = argv[0], {}
    for a in argv[1:]:
        k, _, v = a.lstrip("-").partition("=")
        kw[k] = ast.literal_eval(v)
    stop_at = kw.pop("stop_at", None)
    if "threads" in kw:
        torch.set_num_threads(kw.pop("threads"))
    dropout = kw.pop("qformer.dropout", None)
    cfg = tiny_config(**kw)
    if dropout is not None:
        cfg.qformer.dropout = dropout
    try:
        train(cfg, 1, tiny_task(cfg), stop_at=stop_at, progress=False, run_dir=run_dir)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
