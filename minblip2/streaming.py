"""Training on data that does not fit in RAM: a stream of (image, caption) records read from parquet shards.

    python data/write_shards.py --out /data/coco-shards --split train --shards 64   # or your own shards
    minblip2-train --stage 1 --data.source=/data/coco-shards --data.streaming=True ...

Each process reads its own shards (`datasets.distributed.split_dataset_by_node`: disjoint data per rank),
through a seeded shuffle buffer (`IterableDataset.shuffle`, a new order every epoch), and cuts the stream into
micro-batches. DataLoader workers share the work by micro-batch: worker w decodes and crops micro-batches
w, w + W, w + 2W, ... of the same stream (each worker reads all the records, which is cheap, and decodes only
its own, which is what costs), so the batches come out in the same order whatever the number of workers.

The position in the stream, (epoch, records consumed in that epoch) per process, goes into every checkpoint
(`data_state`); a resumed run skips to it without decoding and continues with the very next record, exactly
as if never interrupted. A micro-batch always consumes exactly batch_size records: an unreadable image or an
empty caption (with skip_bad_images) is replaced by a copy of another record of the same micro-batch.
"""
from __future__ import annotations

import glob
import random
from pathlib import Path

import torch

from . import dist
from .data import (WORKER_TIMEOUT_S, BadImageError, SkipCounter, _import_datasets_offline, _no_progress_bars,
                   check_parquet, collate, encode_batch, image_id_as_int, image_identity, load_image,
                   resolve_num_workers)


def list_shards(source) -> list[str]:
    """A folder of *.parquet, one parquet file, or a glob -> the sorted shard paths, each checked (a missing or
    truncated shard is an error here, before training starts, naming the file)."""
    src = Path(str(source)).expanduser()
    if src.is_dir():
        files = sorted(str(p) for p in src.glob("*.parquet"))
    elif any(c in str(source) for c in "*?["):
        files = sorted(glob.glob(str(src)))
    else:
        files = [str(src)]
    if not files:
        raise FileNotFoundError(f"no parquet shards in {source} (write some with data/write_shards.py)")
    for f in files:
        check_parquet(f)
    return files


def shuffle_buffer(records, size: int, rng: random.Random):
    """Approximate shuffling of a stream: keep `size` records, emit a random one, put the next in its place.
    (datasets' IterableDataset.shuffle does the same; its parquet reader then sleeps 5 s at every epoch's end.)"""
    buf = []
    for rec in records:
        if len(buf) < size:
            buf.append(rec)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = rec
    rng.shuffle(buf)
    yield from buf


class RecordStream(torch.utils.data.IterableDataset):
    """This process's micro-batches of a sharded parquet stream, from a position on, forever (epoch after epoch).

    Yields {"num_skipped", "caption", "image_id", "index", "image", "position"}: image is uint8 (B, 3, S, S) from
    `transform`, position = (epoch, records of this epoch consumed once this batch is done) as a LongTensor.
    """

    def __init__(self, shards, transform, micro_batch: int, seed: int = 0, shuffle_buffer: int = 1000,
                 start=(0, 0), rank: int = 0, world_size: int = 1, skip_bad: bool = False,
                 image_column: str = "", text_column: str = ""):
        self.shards, self.transform, self.micro_batch, self.seed = list(shards), transform, micro_batch, seed
        self.shuffle_buffer, self.start, self.rank, self.world_size = shuffle_buffer, tuple(start), rank, world_size
        self.skip_bad, self.image_column, self.text_column = skip_bad, image_column, text_column
        self.skipped = SkipCounter()

    def _columns(self, names):
        from .data import IMAGE_COLUMNS, TEXT_COLUMNS

        img = self.image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
        txt = self.text_column or next((c for c in TEXT_COLUMNS if c in names), None)
        if img not in names or txt not in names:
            raise ValueError(f"shards {self.shards[0]}...: need an image and a text column, have {names}; name them "
                             f"with --data.image_column / --data.text_column")
        return img, txt

    def records(self, epoch: int):
        """This process's records of one epoch, in order: dicts with image (bytes/path), caption, image_id.
        Shards in a new order every epoch (the same on every process), this process's share of them, each row
        expanded into one record per caption, then a shuffle buffer -- all seeded by (seed, epoch)."""
        datasets = _import_datasets_offline()
        from datasets.distributed import split_dataset_by_node

        shards = list(self.shards)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        with _no_progress_bars(datasets):
            ds = datasets.load_dataset("parquet", data_files=shards, split="train", streaming=True)
        img, txt = self._columns(list(ds.features))
        if isinstance(ds.features[img], datasets.Image):
            ds = ds.cast_column(img, datasets.Image(decode=False))  # bytes: only the records we use get decoded

        def expand(batch):  # a row with a list of captions -> one record per caption
            out = {"image": [], "caption": [], "image_id": []}
            ids = batch.get("image_id") or [None] * len(batch[txt])  # None: _sample derives one from the image
            for image, text, image_id in zip(batch[img], batch[txt], ids):
                for c in text if isinstance(text, list) else [text]:
                    out["image"].append(image), out["caption"].append(c), out["image_id"].append(image_id)
            return out

        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        ds = ds.map(expand, batched=True, batch_size=64, remove_columns=list(ds.features))  # 64 rows of bytes at a time

        def rows():
            for batch in ds.iter(batch_size=64):  # .iter: no automatic split by DataLoader worker (we split by batch)
                for i in range(len(batch["caption"])):
                    yield {k: batch[k][i] for k in ("image", "caption", "image_id")}

        yield from shuffle_buffer(rows(), self.shuffle_buffer, random.Random((self.seed * 1_000_003 + epoch) * 1_000_003
                                                                          + self.rank))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, offset = self.start
        m, buf = 0, []
        while True:
            n = -1
            for n, rec in enumerate(self.records(epoch)):
                if n < offset:  # resuming: skip what was consumed, without decoding it
                    continue
                buf.append((epoch, n, rec))
                if len(buf) == self.micro_batch:
                    if m % workers == worker:
                        yield self._batch(buf)
                    m, buf = m + 1, []
            if n < 0:
                raise ValueError(f"process {self.rank} of {self.world_size} got no records from {len(self.shards)} "
                                 f"shard(s) ({self.shards[0]}, ...): too few shards or rows for this many processes?")
            epoch, offset = epoch + 1, 0

    def _sample(self, epoch, n, rec):
        caption = rec["caption"]
        where = f"record {n} of epoch {epoch} (image_id {rec['image_id']})"
        if not isinstance(caption, str) or not caption.strip():
            if self.skip_bad:
                self.skipped.add(f"<empty caption: {where}>")
                return None
            raise ValueError(f"empty caption in the stream: {where}. Pass --data.skip_bad_images=True to skip such records")
        image = load_image(rec["image"], skip_bad=self.skip_bad)
        if image is None:
            self.skipped.add(rec["image"])
            return None
        with torch.random.fork_rng(devices=[]):  # this record's own crop: the same after a resume
            torch.manual_seed((((self.seed * 1_000_003 + self.rank) * 1_000_003 + epoch) * 1_000_003 + n) % 2**63)
            pixels = self.transform(image)
        # shards without an image_id column (data/README.md invites them): the image's own bytes name it. Every
        # record sharing one id (-1, as here before) made ITC's targets uniform and left ITM no negative
        image_id = image_id_as_int(rec["image_id"])
        if image_id is None:
            image_id = image_identity(rec["image"])
        return {"caption": caption, "image_id": image_id, "index": n, "image": pixels}

    def _batch(self, buf):
        items = [self._sample(*b) for b in buf]
        good = [i for i, x in enumerate(items) if x is not None]
        if not good:
            raise BadImageError(f"every record of a micro-batch is unreadable (records {buf[0][1]}-{buf[-1][1]} of "
                                f"epoch {buf[0][0]}, e.g. {self.skipped.bad_files[-1]})")
        # a bad record's place goes to the next good record of the same micro-batch (the batch keeps its size)
        filled = [items[i] if items[i] is not None else items[next((g for g in good if g > i), good[0])]
                  for i in range(len(items))]
        batch = collate(filled)
        batch["num_skipped"] = len(items) - len(good)
        batch["position"] = torch.tensor([buf[-1][0], buf[-1][1] + 1])
        return batch


class StreamingData:
    """A streamed training source with the same interface as tasks.ImageTextData (batches, model_inputs,
    data_state): what train() uses when --data.streaming=True."""

    def __init__(self, shards, encoder, transform, skip_bad=False, num_workers=0, prefetch_factor=2,
                 shuffle_buffer=1000, image_column="", text_column=""):
        self.shards, self.encoder, self.transform, self.skip_bad = shards, encoder, transform, skip_bad
        self.num_workers, self.prefetch_factor, self.shuffle_buffer = num_workers, prefetch_factor, shuffle_buffer
        self.image_column, self.text_column = image_column, text_column
        self.resume_from = None  # {"world_size", "positions"} from a checkpoint
        self.position = None  # (epoch, offset) after the last micro-batch handed out
        self.device = torch.device("cpu")

    @classmethod
    def build(cls, cfg, device) -> "StreamingData":
        from .backbones import load_image_encoder
        from .data import train_transform

        d = cfg.data
        encoder = load_image_encoder(cfg.vision).to(device)
        return cls(list_shards(d.source), encoder,
                   train_transform(encoder.img_size, encoder.mean, encoder.std, normalize=False),
                   skip_bad=d.skip_bad_images, num_workers=resolve_num_workers(d, device),
                   prefetch_factor=d.prefetch_factor, shuffle_buffer=d.shuffle_buffer,
                   image_column=d.image_column, text_column=d.text_column)

    @property
    def num_samples(self):
        raise TypeError("a streamed source has no length (and no random access)")

    def load_data_state(self, state):
        self.resume_from = state

    def _start(self, start: int, t):
        """Where this process resumes: the checkpoint's position, or -- without one (a checkpoint written before
        positions were saved) -- start * batch records from the very beginning (a micro-batch always takes
        exactly batch_size records, so this is exact too, only slower to skip)."""
        if self.resume_from is None or start == 0:
            return (0, start * t.batch_size * t.grad_accum)
        if self.resume_from["world_size"] != dist.world_size():
            raise ValueError(f"this streamed run was checkpointed with {self.resume_from['world_size']} processes "
                             f"and resumes with {dist.world_size()}: each process's position in its shards would "
                             f"not carry over. Resume with the same number of processes.")
        return tuple(self.resume_from["positions"][dist.rank()])

    def batches(self, start: int, end: int, t, device):
        self.device = torch.device(device)
        stream = RecordStream(self.shards, self.transform, t.batch_size, seed=t.seed,
                              shuffle_buffer=self.shuffle_buffer, start=self._start(start, t), rank=dist.rank(),
                              world_size=dist.world_size(), skip_bad=self.skip_bad, image_column=self.image_column,
                              text_column=self.text_column)
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                             pin_memory=self.device.type == "cuda",
                                             prefetch_factor=self.prefetch_factor if workers else None,
                                             persistent_workers=workers > 0, generator=torch.Generator(),
                                             timeout=WORKER_TIMEOUT_S if workers else 0)
        it = iter(loader)
        for _ in range(start, end):
            step = [next(it) for _ in range(t.grad_accum)]
            self.position = tuple(step[-1]["position"].tolist())
            yield step

    def data_state(self) -> dict:
        """Every process's position (a collective: called by all of them at the same step)."""
        mine = torch.tensor(self.position or (0, 0), dtype=torch.long,
                            device=self.device if self.device.type == "cuda" else "cpu")
        positions = dist.all_gather_no_grad(mine.view(1, 2)).cpu().tolist()
        return {"kind": "stream", "world_size": dist.world_size(), "positions": positions}

    def model_inputs(self, batch, device):
        return encode_batch(self.encoder, batch, device)
