"""Images and captions: COCO records, image transforms, caption cleaning, Datasets and the batch collator.

The data on disk is one directory (coco-mini, or full COCO written by `data/download_coco_karpathy.py`):

    <root>/captions.jsonl   one JSON object per image: image_id, file, split, captions, ...
    <root>/<file>           the image that `file` names (relative to root)

`load_coco` turns that into a Hugging Face `datasets.Dataset` of records (one per caption, or one per
image); `ImageTextDataset` + `collate` turn records into training batches; `ImageDataset` serves unique
images (feature caching, retrieval and captioning eval).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

SPLITS = ("train", "val", "test")  # Karpathy splits; "train" already includes "restval"
HOW_TO_GET_DATA = ("Get coco-mini with `python data/download_coco_mini.py --out DIR` (or full COCO with "
                   "`python data/download_coco_karpathy.py --out DIR`), then set MINBLIP2_DATA=DIR "
                   "or pass --data.root=DIR.")


# ----------------------------------------------------------------------------- records


def load_coco(root: str | Path | None = None, split: str = "train", per: str = "caption"):
    """Read `<root>/captions.jsonl` and return one split as a `datasets.Dataset`.

    per="caption": one row per (image, caption): image_id, image_path, caption, caption_idx.
                   Training iterates these, so every caption is seen once per epoch (as in BLIP/LAVIS).
    per="image":   one row per image: image_id, image_path, captions (a list). Evaluation uses these.
    `image_path` is absolute. `root=None` (or "") means `config.default_data_root()`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    if per not in ("caption", "image"):
        raise ValueError(f"per must be 'caption' or 'image', got {per!r}")
    if not root:
        from minblip2.config import default_data_root
        root = default_data_root()
    root = Path(root).expanduser().resolve()
    jsonl = root / "captions.jsonl"
    if not jsonl.is_file():
        what = "directory" if not root.is_dir() else "file"
        raise FileNotFoundError(f"no COCO data: looked for {jsonl} ({what} missing). {HOW_TO_GET_DATA}")

    datasets = _import_datasets_offline()
    with _no_progress_bars(datasets):
        # A local JSON file needs no network; the parsed Arrow table is cached under ~/.cache/huggingface
        # (keyed on the file's path and modification time), so the full COCO file is parsed only once.
        ds = datasets.load_dataset("json", data_files=str(jsonl), split="train")  # "train" = all rows of the file
        ds = ds.filter(lambda s: [x == split for x in s], input_columns="split", batched=True, keep_in_memory=True)
        if len(ds) == 0:
            raise ValueError(f"{jsonl} has no images with split={split!r}")
        to_records = functools.partial(_to_records, root=str(root), jsonl=str(jsonl), per_caption=per == "caption")
        # keep_in_memory: these small derived tables are rebuilt in milliseconds; no stale cache files.
        ds = ds.map(to_records, batched=True, remove_columns=ds.column_names, keep_in_memory=True)
    return ds


def _to_records(batch: dict, root: str, jsonl: str, per_caption: bool) -> dict:
    """A batch of captions.jsonl rows -> records, checking every caption on the way."""
    out = {"image_id": [], "image_path": []}
    out.update({"caption": [], "caption_idx": []} if per_caption else {"captions": []})
    for image_id, file, captions in zip(batch["image_id"], batch["file"], batch["captions"]):
        if not captions:
            raise ValueError(f"image_id {image_id} has no captions in {jsonl}")
        for k, c in enumerate(captions):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"empty caption #{k} for image_id {image_id} in {jsonl}")
        path = os.path.join(root, file)
        if per_caption:  # one row per caption, the image repeated
            for k, c in enumerate(captions):
                out["image_id"].append(image_id), out["image_path"].append(path)
                out["caption"].append(c), out["caption_idx"].append(k)
        else:
            out["image_id"].append(image_id), out["image_path"].append(path), out["captions"].append(list(captions))
    return out


def _import_datasets_offline():
    # Set before `datasets` is first imported (it reads these once): never wait on the network, no telemetry.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(var, "1")
    import datasets
    return datasets


@contextlib.contextmanager
def _no_progress_bars(datasets):
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# ----------------------------------------------------------------------------- captions


def pre_caption(text: str, max_words: int = 50) -> str:
    """BLIP/LAVIS caption cleaning: lowercase, punctuation .!"()*#:; and ~ -> space, collapse
    whitespace, strip, keep the first `max_words` words. An over-long caption is truncated, not an error."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def tokenize(tokenizer, captions: list[str], max_len: int = 32) -> dict:
    """pre_caption + tokenizer: pad to the longest caption in the batch, truncate to `max_len` tokens
    ([CLS] and [SEP] included). Returns input_ids and attention_mask, both (B, L) LongTensors."""
    enc = tokenizer([pre_caption(c) for c in captions], padding="longest", truncation=True,
                    max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ----------------------------------------------------------------------------- images


class BadImageError(ValueError):
    """An image file that is missing, corrupt or truncated."""


def load_image(path: str | Path, skip_bad: bool = False) -> Image.Image | None:
    """Open an image as RGB. Every mode becomes RGB: L (grayscale; COCO has some) is copied to 3
    channels, 16-bit grayscale is scaled to 8 bits first, RGBA/LA/P-with-transparency lose their alpha
    (no compositing), CMYK/YCbCr/P are converted.
    EXIF orientation is NOT applied: COCO's captions were written for the stored pixels (BLIP does the same).
    A bad file raises BadImageError, or returns None when `skip_bad` (the caller counts and skips it)."""
    try:
        with Image.open(path) as img:
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when P+transparency goes straight to RGB
            elif img.mode.startswith("I"):  # 16-bit grayscale PNG/TIFF: convert("RGB") would clip at 255
                img = img.convert("I").point(lambda v: v / 256).convert("L")
            return img.convert("RGB")  # convert() forces the full decode, so truncation is caught here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # OSError covers missing
        if skip_bad:
            return None
        raise BadImageError(f"cannot read image {path}: {e}. To skip unreadable images (counted, with a "
                            f"warning) pass --data.skip_bad_images=True") from e


def train_transform(img_size: int, mean, std):
    """BLIP-2's training augmentation (LAVIS blip2_image_train): a random crop covering 50-100% of the
    image, resized (bicubic) to img_size, and a random horizontal flip (captions saying left/right are
    not swapped; BLIP ignores this too). `mean`/`std` must be the image encoder's own statistics."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),  # HWC uint8 -> CHW float in [0, 1]
        T.Normalize(mean, std),
    ])


def eval_transform(img_size: int, mean, std):
    """Deterministic: shorter side -> img_size (bicubic), then the central img_size square.
    (LAVIS instead squashes to img_size x img_size; most coco-mini images are already square.)"""
    return T.Compose([
        T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


# ----------------------------------------------------------------------------- torch datasets


class SkipCounter:
    """Remembers skipped (unreadable) files; warns once, on the first one; `report()` warns the total."""

    def __init__(self):
        self.bad_files: list[str] = []

    def add(self, path):
        if not self.bad_files:
            warnings.warn(f"skipping unreadable image {path} (skip_bad_images=True); "
                          "further skips are counted and reported at the end", stacklevel=3)
        self.bad_files.append(str(path))

    def report(self) -> int:
        """Warn with the number of skipped images (call at the end of an epoch / run); returns it."""
        if self.bad_files:
            warnings.warn(f"skipped {len(self.bad_files)} unreadable image(s), e.g. {self.bad_files[0]}")
        return len(self.bad_files)


class ImageTextDataset(torch.utils.data.Dataset):
    """(image, caption) items from `load_coco(per="caption")` records (a datasets.Dataset or list of dicts).

    Item: {"image": (3,H,W) tensor, "caption": str, "image_id": int, "index": int}, or None for a bad
    image when skip_bad (collate drops it). `transform=None` loads no image at all: for training on
    cached image features, looked up by image_id. Use `dataset.collate_fn` as the DataLoader's collate_fn.
    With num_workers > 0 the workers' counts do not reach `dataset.skipped`: sum batch["num_skipped"].
    """

    def __init__(self, records, transform, tokenizer=None, skip_bad: bool = False, max_len: int = 32):
        self.skipped = SkipCounter()  # call dataset.skipped.report() at the end of training
        self.records, self.transform, self.tokenizer = records, transform, tokenizer
        self.skip_bad, self.max_len = skip_bad, max_len

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index: int):
        r = self.records[index]
        item = {"caption": r["caption"], "image_id": r["image_id"], "index": index}
        if self.transform is not None:
            img = load_image(r["image_path"], skip_bad=self.skip_bad)
            if img is None:
                self.skipped.add(r["image_path"])
                return None
            item["image"] = self.transform(img)
        return item

    @property
    def collate_fn(self):
        return functools.partial(collate, tokenizer=self.tokenizer, max_len=self.max_len)


class ImageDataset(torch.utils.data.Dataset):
    """Unique images (e.g. `load_coco(per="image")["image_path"]`) for feature caching and evaluation.
    Item: {"image", "index", "image_path"}; `index` tells which ones survived when skip_bad drops some."""

    def __init__(self, image_paths, transform, skip_bad: bool = False):
        self.skipped = SkipCounter()
        self.image_paths, self.transform, self.skip_bad = list(image_paths), transform, skip_bad

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index: int):
        path = self.image_paths[index]
        img = load_image(path, skip_bad=self.skip_bad)
        if img is None:
            self.skipped.add(path)
            return None
        return {"image": self.transform(img), "index": index, "image_path": str(path)}


def collate(batch: list, tokenizer=None, max_len: int = 32) -> dict | None:
    """Items -> one batch with the same keys: "image" stacked to (B,3,H,W), "image_id"/"index" as
    LongTensors, strings kept as lists; with a tokenizer also input_ids/attention_mask (see `tokenize`).
    None items (skipped bad images) are dropped and counted in "num_skipped"; if every item was bad
    the whole batch is None, so the training loop should skip it."""
    items = [b for b in batch if b is not None]
    if not items:
        return None
    out = {"num_skipped": len(batch) - len(items)}
    for key in items[0]:
        values = [b[key] for b in items]
        if key == "image":
            out[key] = torch.stack(values)
        elif key in ("image_id", "index"):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    if tokenizer is not None and "caption" in out:
        out.update(tokenize(tokenizer, out["caption"], max_len))
    return out
