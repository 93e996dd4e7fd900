"""What each stage trains: its model, its data (image tokens + captions) and how a batch becomes a loss.

The training loop (train.py) is the same for both stages; this file holds the difference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones import load_bert, load_image_encoder, load_llm
from .config import Config
from .data import load_coco, load_image, pre_caption, tokenize, train_transform
from .features import cached_features
from .qformer import load_bert_weights
from .stage1 import Stage1Model


@dataclass
class ImageTextData:
    """The training pairs of a split: one row per caption, image tokens looked up (or computed) per batch.

    With cached features and V augmented views, sample j is caption j % num_captions seen through view
    j // num_captions (view 0 = the center crop): an epoch pairs every caption with every view once.
    """

    captions: list[str]
    image_ids: torch.Tensor  # (num_captions,)
    image_paths: list[str]  # unique images
    row_of_caption: torch.Tensor  # caption i -> its image's row in image_paths / features
    encoder: torch.nn.Module
    features: torch.Tensor | None = None  # (num_images, N, D) float16 when cached: the center crops
    views: list = field(default_factory=list)  # cached augmented views, each like `features`
    transform: object = None  # augmentation for the uncached path
    skip_bad: bool = False

    @classmethod
    def build(cls, cfg: Config, split: str, cache: bool, device) -> "ImageTextData":
        recs = load_coco(cfg.data.root, split, per="caption")
        paths = list(dict.fromkeys(recs["image_path"]))
        row = {p: i for i, p in enumerate(paths)}
        encoder = load_image_encoder(cfg.vision).to(device)
        data = cls(list(recs["caption"]), torch.tensor(recs["image_id"]), paths,
                   torch.tensor([row[p] for p in recs["image_path"]]), encoder, skip_bad=cfg.data.skip_bad_images)
        if cache:
            amp = "bf16" if device.type == "cpu" else "fp16"
            data.features = cached_features(encoder, cfg.vision, paths, device=device, amp=amp)
            data.views = [cached_features(encoder, cfg.vision, paths, view=v, device=device, amp=amp)
                          for v in range(1, cfg.data.augmented_views + 1)]
        else:
            data.transform = train_transform(encoder.img_size, encoder.mean, encoder.std)
        return data

    def __len__(self):
        return len(self.captions)

    @property
    def all_views(self) -> list:
        """[center crops, augmented view 1, ...]: view v of sample j's image is all_views[v][row]."""
        return [self.features] + self.views

    @property
    def num_samples(self) -> int:
        return len(self.captions) * (1 + len(self.views))

    def batch(self, idx: torch.Tensor, device):
        """(image tokens (B, N, D) float32, captions, image ids) for sample indices `idx`."""
        view, idx = idx // len(self.captions), idx % len(self.captions)
        rows = self.row_of_caption[idx]
        if self.features is not None:
            views = self.all_views
            # float32 before stacking: train() calls this under autocast, which rejects stacking float16 on a CPU
            emb = torch.stack([views[v][r].float() for v, r in zip(view.tolist(), rows.tolist())]).to(device)
        else:  # augment and encode now; the encoder is frozen, so no graph is kept
            imgs = [load_image(self.image_paths[r], skip_bad=self.skip_bad) for r in rows.tolist()]
            keep = [i for i, im in enumerate(imgs) if im is not None]
            if len(keep) < len(imgs):
                print(f"skipped {len(imgs) - len(keep)} unreadable image(s) in this batch")
            idx = idx[keep]
            with torch.no_grad():
                emb = self.encoder(torch.stack([self.transform(imgs[i]) for i in keep]).to(device))
        return emb, [self.captions[i] for i in idx.tolist()], self.image_ids[idx].to(device)


@dataclass
class StageTask:
    model: torch.nn.Module
    data: ImageTextData
    tokenizer: object = None  # stage 1: the Q-Former's BERT tokenizer
    max_text_len: int = 32
    has_unused_parameters: bool = False
    stage: int = 1

    @property
    def num_samples(self):
        return self.data.num_samples

    def loss(self, model, idx, device, generator=None) -> dict:
        """generator: stage 1's ITM negative sampling (train.py passes one seeded by the step, alike in every
        process); stage 2 ignores it."""
        emb, caps, ids = self.data.batch(idx, device)
        if self.stage == 1:
            tok = tokenize(self.tokenizer, caps, self.max_text_len)
            return model(emb, tok["input_ids"].to(device), tok["attention_mask"].to(device), image_ids=ids,
                         generator=generator)
        return model(emb, [pre_caption(c) for c in caps])  # cleaned as stage 1's (tokenize) and LAVIS's are


def build_stage1_model(cfg: Config):
    """A Stage1Model with its Q-Former initialised from BERT, and the BERT tokenizer (+ [DEC])."""
    model = Stage1Model(cfg.qformer, cfg.stage1)
    bert_state, tokenizer = load_bert(cfg.qformer)
    if bert_state is not None:
        fresh = set(load_bert_weights(model.qformer, bert_state))
        # what BERT initialised may learn more slowly (Stage1Config.pretrained_lr_scale, see train.build_optimizer)
        model.pretrained_names = {f"qformer.{n}" for n, _ in model.qformer.named_parameters() if n not in fresh}
        if model.lm_head.load_bert(bert_state):  # BERT's masked-LM head, where the checkpoint has one
            model.pretrained_names |= {n for n, _ in model.named_parameters() if n.startswith("lm_head.")}
    return model, tokenizer


def build_stage2_model(cfg: Config, stage1_dir: str | Path | None = None):
    """A Stage2Model on the frozen LLM; its Q-Former comes from the stage-1 run (unless from_stage1=False)."""
    from .stage2 import Stage2Model
    from .train import latest_checkpoint
    from safetensors.torch import load_file

    llm, tokenizer = load_llm(cfg.llm)
    model = Stage2Model(cfg.qformer, llm, tokenizer, prompt=cfg.llm.prompt, max_text_len=cfg.data.max_text_len)
    if cfg.stage2.from_stage1:
        stage1_dir = Path(stage1_dir or Path(cfg.out_dir) / "stage1")
        ckpt = latest_checkpoint(stage1_dir / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(
                f"stage 2 starts from a stage-1 checkpoint, but {stage1_dir}/checkpoints has none. Train stage 1 "
                f"first (python -m minblip2.train --stage 1), pass --init_from=RUN/stage1, or train from a random "
                f"Q-Former with --stage2.from_stage1=False")
        model.from_stage1(load_file(str(ckpt / "model.safetensors")))
    return model


def build_task(cfg: Config, stage: int, device, stage1_dir=None) -> StageTask:
    t = cfg.stage1 if stage == 1 else cfg.stage2
    data = ImageTextData.build(cfg, "train", t.cache_features, device)
    if stage == 1:
        model, tokenizer = build_stage1_model(cfg)
        unused = set(cfg.stage1.losses) != {"itc", "itm", "itg"}
        return StageTask(model, data, tokenizer, cfg.data.max_text_len, unused, stage=1)
    return StageTask(build_stage2_model(cfg, stage1_dir), data, stage=2)
