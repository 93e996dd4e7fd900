"""What each stage trains: its model, its data (image tokens + captions) and how a batch becomes a loss.

The training loop (train.py) is the same for both stages; this file holds the difference.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import dist, runtime
from .backbones import load_bert, load_image_encoder, load_llm
from .checkpoint import latest_checkpoint
from .config import Config, TrainConfig
from .data import (WORKER_TIMEOUT_S, ImageTextDataset, Pairs, encode_batch, load_coco, load_pairs, pairs_from_records,
                   pre_caption, resolve_num_workers, tokenize, train_transform)
from .features import cached_features
from .qformer import load_bert_weights
from .stage1 import Stage1Model
from .stage2 import Stage2Model


# ----------------------------------------------------------------------------- data order


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> torch.Tensor:
    """The global batch of `step`: epoch e shuffles 0..n-1 with seed+e and takes consecutive slices.

    A pure function of (seed, step): resuming at any step sees exactly the batches it would have seen,
    and splitting the global batch into per-process slices (see `local_slice`) gives DDP the same data
    as one process with the whole batch. The last partial batch of an epoch is dropped.
    """
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"the global batch ({global_batch}) is larger than the dataset ({n} samples)")
    epoch, i = divmod(step, per_epoch)
    return _permutation(n, seed + epoch)[i * global_batch:(i + 1) * global_batch].clone()


@functools.lru_cache(maxsize=1)
def _permutation(n: int, seed: int) -> torch.Tensor:  # once per epoch, not once per step (n may be 10^8)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def local_slice(idx: torch.Tensor) -> torch.Tensor:
    """This process's share of a global batch (rank order)."""
    b = len(idx) // dist.world_size()
    return idx[dist.rank() * b:(dist.rank() + 1) * b]


class StepSampler(torch.utils.data.Sampler):
    """This process's micro-batches of sample indices for steps start..end-1, in training order: step s's
    `local_slice(batch_indices(s, ...))` cut into grad_accum micro-batches.

    An index is numbered across epochs (j + e * n), so a sample's augmentation differs from epoch to epoch
    (ImageTextDataset reads it as j % n). A pure function of the step: resuming at any step is exact.
    """

    def __init__(self, start: int, end: int, n: int, batch_size: int, grad_accum: int, seed: int):
        self.start, self.end, self.n, self.seed = start, end, n, seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.global_batch = batch_size * grad_accum * dist.world_size()
        if n // self.global_batch == 0:
            raise ValueError(f"the global batch ({self.global_batch}) is larger than the dataset ({n} samples)")

    def __len__(self):
        return max(0, self.end - self.start) * self.grad_accum

    def __iter__(self):
        per_epoch = self.n // self.global_batch
        for step in range(self.start, self.end):
            idx = local_slice(batch_indices(step, self.n, self.global_batch, self.seed)) + (step // per_epoch) * self.n
            for m in range(self.grad_accum):
                yield idx[m * self.batch_size:(m + 1) * self.batch_size]


@dataclass
class ImageTextData:
    """The training pairs of a split: one row per caption, image tokens looked up (or computed) per batch.

    With cached features and V augmented views, sample j is caption j % num_captions seen through view
    j // num_captions (view 0 = the center crop): an epoch pairs every caption with every view once.
    Batches come from a DataLoader over `dataset()` (an ImageTextDataset): worker processes decode and crop
    images (or gather cached rows by index), pinned memory, prefetching; the frozen encoder then runs on the
    device on the whole batch (`model_inputs`).
    """

    captions: list[str]
    image_ids: torch.Tensor  # (num_captions,)
    image_paths: list  # unique images (paths, or {"bytes", "path"} for images stored in a dataset)
    row_of_caption: torch.Tensor  # caption i -> its image's row in image_paths / features
    encoder: torch.nn.Module
    features: torch.Tensor | None = None  # (num_images, N, D) float16 when cached: the center crops (memory-mapped)
    views: list = field(default_factory=list)  # cached augmented views, each like `features`
    transform: object = None  # augmentation for the uncached path (uint8 pixels out)
    skip_bad: bool = False
    num_workers: int = 0  # DataLoader worker processes
    prefetch_factor: int = 2

    @classmethod
    def build(cls, cfg: Config, split: str, cache: bool, device) -> "ImageTextData":
        """COCO's `split` (cfg.data.root), or your own data (cfg.data.source, see data.load_pairs)."""
        d = cfg.data
        if d.source:
            pairs = load_pairs(d.source, d.image_column, d.text_column, split)
        else:
            pairs = pairs_from_records(load_coco(d.root, split, per="caption"))
        encoder = load_image_encoder(cfg.vision).to(device)
        workers = resolve_num_workers(d, device)
        data = cls(pairs.captions, pairs.image_ids, pairs.images, pairs.row_of_caption, encoder,
                   skip_bad=d.skip_bad_images, num_workers=workers, prefetch_factor=d.prefetch_factor)
        if cache:
            kw = dict(device=device, amp=runtime.resolve_amp("auto", device), num_workers=workers)
            data.features = cached_features(encoder, cfg.vision, pairs.images, **kw)
            data.views = [cached_features(encoder, cfg.vision, pairs.images, view=v, **kw)
                          for v in range(1, d.augmented_views + 1)]
        else:
            data.transform = train_transform(encoder.img_size, encoder.mean, encoder.std, normalize=False)
        return data

    def __len__(self):
        return len(self.captions)

    @property
    def all_views(self) -> list:
        """[center crops, augmented view 1, ...]: view v of sample j's image is all_views[v][row]."""
        return [self.features] + self.views if self.features is not None else []

    @property
    def num_samples(self) -> int:
        return len(self.captions) * (1 + len(self.views))

    def dataset(self, seed: int | None = None) -> ImageTextDataset:
        """The Dataset the DataLoader reads (built on demand: the fields above may be swapped, as the sweeps do)."""
        pairs = Pairs(self.captions, self.image_ids, self.image_paths, self.row_of_caption)
        return ImageTextDataset.from_pairs(pairs, views=self.all_views, transform=self.transform,
                                           skip_bad=self.skip_bad, seed=seed)

    def batches(self, start: int, end: int, t: TrainConfig, device):
        """This process's data for steps start..end-1: per step, a list of t.grad_accum micro-batches (dicts)."""
        device = torch.device(device)
        sampler = StepSampler(start, end, self.num_samples, t.batch_size, t.grad_accum, t.seed)
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset(seed=t.seed), batch_sampler=sampler, collate_fn=_as_is, num_workers=workers,
            pin_memory=device.type == "cuda", prefetch_factor=self.prefetch_factor if workers else None,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(t.seed),  # not the global RNG
            timeout=WORKER_TIMEOUT_S if workers else 0)
        it = iter(loader)
        for _ in range(start, end):
            yield [next(it) for _ in range(t.grad_accum)]

    def model_inputs(self, batch: dict, device):
        """A batch -> (image tokens (B, N, D) float32 on `device`, captions, image ids on `device`)."""
        return encode_batch(self.encoder, batch, device)

    def batch(self, idx: torch.Tensor, device):
        """(image tokens (B, N, D) float32, captions, image ids) for sample indices `idx`."""
        return self.model_inputs(self.dataset().__getitems__(idx), device)


def _as_is(batch):
    return batch  # ImageTextDataset.__getitems__ already returns the collated batch


@dataclass
class StageTask:
    """What train() needs from a stage: the model, its data, and `loss(model, batch)`. Stage1Task and Stage2Task
    differ only in how a batch of (image tokens, captions) becomes the model's input."""

    model: torch.nn.Module
    data: ImageTextData
    has_unused_parameters: bool = False  # DDP must look for parameters without gradients (a loss switched off)

    @property
    def num_samples(self):
        return self.data.num_samples

    def batches(self, start: int, end: int, t: TrainConfig, device):
        """What train() iterates: per step, this process's t.grad_accum micro-batches."""
        return self.data.batches(start, end, t, device)

    def data_state(self):
        """Where the data stands, for the checkpoint (a stream's position; None for indexed data: the step says it)."""
        return self.data.data_state() if hasattr(self.data, "data_state") else None

    def load_data_state(self, state):
        if hasattr(self.data, "load_data_state"):
            self.data.load_data_state(state)

    def loss(self, model, batch, device, generator=None) -> dict:
        """batch: a micro-batch from `batches`, or sample indices (a LongTensor). generator: stage 1's ITM negative
        sampling (train.py passes one seeded by the step, alike in every process); stage 2 ignores it."""
        if torch.is_tensor(batch):  # sample indices (lessons, tests): the data looks them up
            (emb, caps, ids), batch = self.data.batch(batch, device), {}
        else:
            emb, caps, ids = self.data.model_inputs(batch, device)
        out = self.forward(model, emb, caps, ids, device, generator)
        if getattr(self.data, "skip_bad", False):  # train() logs the step's total over micro-batches and processes
            out = {**out, "bad_images": torch.tensor(float(batch.get("num_skipped", 0)), device=device)}
        return out


@dataclass
class Stage1Task(StageTask):
    tokenizer: object = None  # the Q-Former's BERT tokenizer
    max_text_len: int = 32

    def __post_init__(self):
        if set(self.model.scfg.losses) != {"itc", "itm", "itg"}:
            self.has_unused_parameters = True  # e.g. no ITG: the LM head gets no gradient

    def forward(self, model, emb, caps, ids, device, generator):
        tok = tokenize(self.tokenizer, caps, self.max_text_len)
        return model(emb, tok["input_ids"].to(device), tok["attention_mask"].to(device), image_ids=ids,
                     generator=generator)


@dataclass
class Stage2Task(StageTask):
    def forward(self, model, emb, caps, ids, device, generator):
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
    llm, tokenizer = load_llm(cfg.llm)
    model = Stage2Model(cfg.qformer, llm, tokenizer, prompt=cfg.llm.prompt, max_text_len=cfg.data.max_text_len)
    if cfg.stage2.from_stage1:
        stage1_dir = Path(stage1_dir or Path(cfg.out_dir) / "stage1")
        ckpt = latest_checkpoint(stage1_dir / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(
                f"stage 2 starts from a stage-1 checkpoint, but {stage1_dir}/checkpoints has none. Train stage 1 "
                f"first (minblip2-train --stage 1), pass --init_from=RUN/stage1, or train from a random "
                f"Q-Former with --stage2.from_stage1=False")
        model.from_stage1(load_file(str(ckpt / "model.safetensors")))
    return model


def build_task(cfg: Config, stage: int, device, stage1_dir=None) -> StageTask:
    t = cfg.stage1 if stage == 1 else cfg.stage2
    if cfg.data.streaming:  # parquet shards read as a stream (streaming.py); images are encoded at every step
        from .streaming import StreamingData

        if not cfg.data.source:
            raise ValueError("--data.streaming=True reads --data.source=SHARDS (a folder of parquet files, see "
                             "data/write_shards.py)")
        data = StreamingData.build(cfg, device)
    else:
        data = ImageTextData.build(cfg, "train", t.cache_features, device)
    if stage == 1:
        model, tokenizer = build_stage1_model(cfg)
        return Stage1Task(model, data, tokenizer=tokenizer, max_text_len=cfg.data.max_text_len)
    return Stage2Task(build_stage2_model(cfg, stage1_dir), data)
