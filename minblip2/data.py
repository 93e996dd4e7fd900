"""Images and captions: COCO records, your own data, image transforms, caption cleaning, the training Dataset.

The data on disk is one directory (coco-mini, or full COCO written by `data/download_coco_karpathy.py`):

    <root>/captions.jsonl   one JSON object per image: image_id, file, split, captions, ...
    <root>/<file>           the image that `file` names (relative to root)

`load_coco` turns that into a Hugging Face `datasets.Dataset` of records (one per caption, or one per
image); `load_pairs` reads your own data (a folder with metadata.jsonl/.csv, a JSONL/CSV file, parquet
shards, any `datasets` dataset with an image and a text column). `ImageTextDataset` is THE training Dataset:
sample j -> (pixels or a cached feature row, caption, image id), a whole batch fetched by index at once
(`__getitems__`, what a DataLoader calls), an unreadable image replaced so that batches keep their size.
`ImageDataset` serves unique images (feature caching, retrieval and captioning eval).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

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


# ----------------------------------------------------------------------------- bring your own data

IMAGE_COLUMNS = ("image", "image_path", "file_name", "file", "path", "jpg", "jpeg", "png")
TEXT_COLUMNS = ("caption", "captions", "text", "txt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "captions.jsonl", "captions.csv")


@dataclass
class Pairs:
    """Training pairs, one per caption: caption i shows image row_of_caption[i] of `images` (unique images:
    absolute paths, or {"bytes", "path"} dicts for images stored inside a dataset)."""

    captions: list
    image_ids: torch.Tensor  # (num_captions,) long
    images: object  # a sequence of unique image sources (list, or a lazy column of a datasets.Dataset)
    row_of_caption: torch.Tensor  # (num_captions,) long


def pairs_from_records(records) -> Pairs:
    """`load_coco(per="caption")` records (a datasets.Dataset, or a list of dicts with image_path, caption,
    image_id) -> Pairs."""
    column = (lambda k: [r[k] for r in records]) if isinstance(records, list) else (lambda k: list(records[k]))
    paths = column("image_path")
    unique = list(dict.fromkeys(paths))
    row = {p: i for i, p in enumerate(unique)}
    return Pairs(column("caption"), torch.tensor(column("image_id"), dtype=torch.long), unique,
                 torch.tensor([row[p] for p in paths], dtype=torch.long))


def load_pairs(source: str | Path, image_column: str = "", text_column: str = "", split: str = "train") -> Pairs:
    """Your own (image, caption) data, as training Pairs. `source` is one of:

    - a folder of images holding metadata.jsonl / metadata.csv (or captions.jsonl / .csv): one row per image
      (or per caption) with a path relative to the folder and a caption (or a list of captions);
    - such a .jsonl / .csv file itself (paths relative to the file's folder);
    - parquet files (a file, a folder of *.parquet, or a glob), or a folder written by `Dataset.save_to_disk`;
    - any other name `datasets.load_dataset` knows (a hub dataset, when online).
    The image column holds paths or images (a `datasets.Image` column); the text column a string or a list of
    strings. Columns are guessed (IMAGE_COLUMNS, TEXT_COLUMNS) unless named. A `split` column, if present, is
    filtered to `split`. Empty captions and missing columns raise a ValueError naming the row and the file.
    """
    ds, base = _open_table(source, split)
    img_col = image_column or next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    txt_col = text_column or next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    for what, col, known in (("image", img_col, IMAGE_COLUMNS), ("text", txt_col, TEXT_COLUMNS)):
        if col not in ds.column_names:
            raise ValueError(f"{source}: no {what} column (columns: {ds.column_names}); name it with "
                             f"--data.{what}_column=NAME (looked for {list(known)})")
    if "split" in ds.column_names:
        ds = ds.filter(lambda s: [x == split for x in s], input_columns="split", batched=True, keep_in_memory=True)
    if len(ds) == 0:
        raise ValueError(f"{source} has no rows" + (f" with split={split!r}" if "split" in ds.column_names else ""))
    datasets = _import_datasets_offline()
    is_image_feature = isinstance(ds.features[img_col], datasets.Image)
    if is_image_feature:  # keep the encoded bytes: decoding happens in the DataLoader's workers
        ds = ds.cast_column(img_col, datasets.Image(decode=False))
    texts = ds[txt_col]
    ids = ds["image_id"] if "image_id" in ds.column_names else range(len(ds))
    captions, image_ids, rows = [], [], []
    for r, (text, image_id) in enumerate(zip(texts, ids)):
        for k, c in enumerate(text if isinstance(text, list) else [text]):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"{source}: empty caption (#{k}) in row {r} (column {txt_col!r})")
            captions.append(c), image_ids.append(_as_id(image_id, r)), rows.append(r)
    if is_image_feature:
        images = _Column(ds, img_col)
    else:
        images = [str(Path(base, p)) if base is not None and not os.path.isabs(p) else str(p) for p in ds[img_col]]
    return Pairs(captions, torch.tensor(image_ids, dtype=torch.long), images, torch.tensor(rows, dtype=torch.long))


def _as_id(x, row: int) -> int:
    """A row's image id as an int (see image_id_as_int); no id at all: the row number identifies the image."""
    image_id = image_id_as_int(x)
    return row if image_id is None else image_id


def image_id_as_int(x) -> int | None:
    """An image id from a data source -> the int a batch carries (ITC and ITM treat equal ids as one image).

    Integers (also "123" and 123.0) stay themselves; any other string or bytes becomes a stable 63-bit hash of
    it, the same in every process and every run (Python's hash() is salted per process), so two rows with the
    id "COCO_val_42" are one image and "a" and "b" are two. None (no id): None, the caller decides."""
    if x is None:
        return None
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, (float, np.floating)) and float(x).is_integer():
        return int(x)
    if isinstance(x, str) and re.fullmatch(r"\s*-?\d+\s*", x):
        return int(x)
    return stable_id(x.encode() if isinstance(x, str) else bytes(x) if isinstance(x, (bytes, bytearray))
                     else repr(x).encode())


def stable_id(data: bytes) -> int:
    """A non-negative 63-bit int from bytes (blake2b): ids for images that come without one. Two different
    images share it with probability ~ n^2 / 2^64 for n images: never, in practice."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1


def image_identity(image) -> int:
    """An id for an image record without an id column: a hash of its encoded bytes (a datasets.Image cell or
    raw bytes), or of its path. The same image twice (two rows with its captions) gets the same id."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path") or b""
    return stable_id(bytes(image) if isinstance(image, (bytes, bytearray)) else str(image).encode())


class _Column:
    """A lazy column of a datasets.Dataset (memory-mapped Arrow): images are read row by row, never all at once."""

    def __init__(self, ds, column):
        self.ds, self.column = ds, column

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[int(i)][self.column]


def _open_table(source, split):
    """source -> (datasets.Dataset, the folder relative image paths start from, or None)."""
    datasets = _import_datasets_offline()
    src = Path(str(source)).expanduser()
    with _no_progress_bars(datasets):
        if src.is_dir() and ((src / "dataset_info.json").exists() or (src / "state.json").exists()):
            ds = datasets.load_from_disk(str(src))
            return (ds[split] if isinstance(ds, datasets.DatasetDict) else ds), None
        if src.is_dir():
            meta = next((src / m for m in METADATA_FILES if (src / m).is_file()), None)
            shards = sorted(src.glob("*.parquet"))
            if meta is None and not shards:
                raise FileNotFoundError(f"{src} has none of {list(METADATA_FILES)} and no *.parquet files: write a "
                                        f"metadata.jsonl with one {{\"file_name\": ..., \"caption\": ...}} per image")
            src = meta or src
        if src.is_file() and src.suffix in (".jsonl", ".json", ".csv"):
            return _read_rows(src), src.parent
        files = sorted(src.glob("*.parquet")) if src.is_dir() else sorted(Path().glob(str(source))) if "*" in str(source) \
            else [src] if src.suffix == ".parquet" else None
        if files is not None:
            if not files:
                raise FileNotFoundError(f"no parquet files match {source}")
            for f in files:
                check_parquet(f)
            return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train"), None
        if src.exists():
            raise ValueError(f"{src}: not a folder, .jsonl, .csv or .parquet file")
        try:
            return datasets.load_dataset(str(source), split=split), None
        except Exception as e:
            raise FileNotFoundError(f"data source {source!r}: no such file or folder, and `datasets` cannot load it "
                                    f"({type(e).__name__}: {e})") from e


def _read_rows(path: Path):
    """A .jsonl / .csv file -> datasets.Dataset (read with the standard library: errors name the line)."""
    datasets = _import_datasets_offline()
    rows = []
    with open(path, newline="") as f:
        if path.suffix == ".csv":
            rows = list(csv.DictReader(f))
        else:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}, line {n}: not JSON ({e})") from e
    if not rows:
        raise ValueError(f"{path} has no rows")
    return datasets.Dataset.from_list(rows)


def check_parquet(path) -> int:
    """The number of rows of a parquet file; a missing or truncated one raises a ValueError naming it."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise FileNotFoundError(f"parquet shard {path} is missing")
    try:
        return pq.ParquetFile(path).metadata.num_rows  # reads the footer: a truncated file has none
    except Exception as e:
        raise ValueError(f"parquet shard {path} is truncated or not parquet ({type(e).__name__}: {e}); "
                         f"write it again (data/write_shards.py)") from e


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


def _describe(src) -> str:
    if isinstance(src, dict):
        return str(src.get("path") or "<image bytes>")
    return "<image bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def _open(src):
    """An image source -> something Image.open reads: a path, or the bytes of an image stored in a dataset."""
    if isinstance(src, dict):  # a datasets.Image(decode=False) value: {"bytes": ..., "path": ...}
        return io.BytesIO(src["bytes"]) if src.get("bytes") else src["path"]
    return io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src


def load_image(path, skip_bad: bool = False) -> Image.Image | None:
    """Open an image as RGB. Every mode becomes RGB: L (grayscale; COCO has some) is copied to 3
    channels, 16-bit grayscale is scaled to 8 bits first, RGBA/LA/P-with-transparency lose their alpha
    (no compositing), CMYK/YCbCr/P are converted.
    EXIF orientation is NOT applied: COCO's captions were written for the stored pixels (BLIP does the same).
    `path` may also be the bytes of an encoded image, or a {"bytes", "path"} dict (a `datasets.Image` column).
    A bad file raises BadImageError, or returns None when `skip_bad` (the caller counts and skips it)."""
    if isinstance(path, Image.Image):
        return path.convert("RGB")
    try:
        with Image.open(_open(path)) as img:
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when P+transparency goes straight to RGB
            elif img.mode.startswith("I"):  # 16-bit grayscale PNG/TIFF: convert("RGB") would clip at 255
                img = img.convert("I").point(lambda v: v / 256).convert("L")
            return img.convert("RGB")  # convert() forces the full decode, so truncation is caught here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # OSError covers missing
        if skip_bad:
            return None
        raise BadImageError(f"cannot read image {_describe(path)}: {e}. To skip unreadable images (counted, with a "
                            f"warning) pass --data.skip_bad_images=True") from e


def image_size(path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    if isinstance(path, Image.Image):
        return path.size
    try:
        with Image.open(_open(path)) as img:
            return img.size
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImageError(f"cannot read image {_describe(path)}: {e}") from e


CROP_SCALE = (0.5, 1.0)  # BLIP-2's random crop covers 50-100% of the image


def _to_tensor(mean, std, normalize: bool):
    # normalize=False: uint8 (3, H, W) pixels, 4x smaller to move; `to_model_input` normalises them on the device
    return [T.ToTensor(), T.Normalize(mean, std)] if normalize else [T.PILToTensor()]


def train_transform(img_size: int, mean, std, normalize: bool = True):
    """BLIP-2's training augmentation (LAVIS blip2_image_train): a random crop covering 50-100% of the
    image, resized (bicubic) to img_size, and a random horizontal flip (captions saying left/right are
    not swapped; BLIP ignores this too). `mean`/`std` must be the image encoder's own statistics.
    normalize=False stops at uint8 pixels (what the DataLoader's workers produce; see `to_model_input`)."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=CROP_SCALE, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        *_to_tensor(mean, std, normalize),  # HWC uint8 -> CHW float in [0, 1], normalised
    ])


def eval_transform(img_size: int, mean, std, normalize: bool = True):
    """Deterministic: shorter side -> img_size (bicubic), then the central img_size square.
    (LAVIS instead squashes to img_size x img_size; most coco-mini images are already square.)"""
    return T.Compose([
        T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        *_to_tensor(mean, std, normalize),
    ])


def to_model_input(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) pixels (on any device) -> float32, normalised: the same numbers as ToTensor + Normalize."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    return pixels.float().div(255).sub_(mean).div_(std)


def view_crops(sizes, seed: int, img_size: int) -> list[tuple[int, int, int, int, bool]]:
    """The random crop + flip of every image of one cached augmented view, drawn in image order from `seed`.

    Drawing them up front needs only each image's size, so the images can then be decoded in any order, by
    any number of workers and processes, and view `seed` is still the same crops. The draws are exactly
    train_transform's (RandomResizedCrop.get_params, then the flip) after the two numbers the v1 cache drew
    first (its DataLoader's base seed, under a progress bar), so the views come out as they were before the
    cache became parallel (and the cpu preset trains on the same crops). Returns (i, j, h, w, flip)."""
    scale, ratio = CROP_SCALE, (3.0 / 4.0, 4.0 / 3.0)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(2):  # what the v1 cache's DataLoader (under tqdm) drew before the first crop
            torch.empty((), dtype=torch.int64).random_()
        for w, h in sizes:
            i, j, ch, cw = T.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, h, w), scale, ratio)
            out.append((i, j, ch, cw, bool(torch.rand(1) < 0.5)))
    return out


def apply_crop(img: Image.Image, crop, img_size: int) -> torch.Tensor:
    """One `view_crops` entry applied like train_transform(normalize=False): -> uint8 (3, img_size, img_size)."""
    i, j, h, w, flip = crop
    img = TF.resized_crop(img, i, j, h, w, [img_size, img_size], T.InterpolationMode.BICUBIC, antialias=True)
    return TF.pil_to_tensor(TF.hflip(img) if flip else img)


# ----------------------------------------------------------------------------- torch datasets


class SkipCounter:
    """Remembers skipped (unreadable) files; warns once, on the first one; `report()` warns the total."""

    def __init__(self):
        self.bad_files: list[str] = []

    def add(self, path):
        if not self.bad_files:
            warnings.warn(f"skipping unreadable image {_describe(path)} (skip_bad_images=True); "
                          "further skips are counted and reported at the end", stacklevel=3)
        self.bad_files.append(_describe(path))

    def report(self) -> int:
        """Warn with the number of skipped images (call at the end of an epoch / run); returns it."""
        if self.bad_files:
            warnings.warn(f"skipped {len(self.bad_files)} unreadable image(s), e.g. {self.bad_files[0]}")
        return len(self.bad_files)


MAX_REPLACEMENT_TRIES = 64
WORKER_TIMEOUT_S = 600  # a DataLoader worker silent this long (a stuck file system) raises instead of hanging


class ImageTextDataset(torch.utils.data.Dataset):
    """(image, caption) training samples: the Dataset the training loop's DataLoader reads.

    Built from records (`load_coco(per="caption")`, or a list of dicts with image_path, caption, image_id), or
    from Pairs (`from_pairs`). The image of a sample is one of
      - pixels: `transform` turns the decoded image into a tensor. Training uses uint8 crops
        (`train_transform(normalize=False)`); the frozen encoder then normalises and encodes the whole batch
        on the device (tasks.py);
      - a cached feature row: `views` = [center crops, augmented view 1, ...], each a (num_images, tokens,
        width) float16 array, memory-mapped (features.py). Sample j is caption j % C through view j // C.

    dataset[j] -> {"caption", "image_id", "index", "image" | "features"}, or None for an unreadable image
    when skip_bad (`collate` then drops it).
    dataset.__getitems__(indices) -> the batch, what a DataLoader calls: cached rows are gathered by index
    in one go; an unreadable image's sample is replaced by the next readable sample in dataset order, so a
    batch never shrinks (DDP processes must have equal batches); "num_skipped" counts the replaced ones.
    Indices may run past len(dataset) (the training sampler numbers samples across epochs): j is read as
    j % len(dataset), and with `seed` set the augmentation of sample j is drawn from (seed, j) -- the same
    crops whatever the number of workers, and after a resume.
    """

    def __init__(self, records=None, transform=None, tokenizer=None, skip_bad: bool = False, max_len: int = 32,
                 pairs: Pairs | None = None, views=(), seed: int | None = None):
        pairs = pairs or pairs_from_records(records)
        self.captions, self.image_ids, self.images = pairs.captions, pairs.image_ids, pairs.images
        self.row_of_caption = pairs.row_of_caption
        self.views, self.transform, self.seed = list(views), transform, seed
        self.tokenizer, self.skip_bad, self.max_len = tokenizer, skip_bad, max_len
        self.skipped = SkipCounter()  # call dataset.skipped.report() at the end of training
        self._bad_rows: set[int] = set()

    @classmethod
    def from_pairs(cls, pairs: Pairs, **kw) -> "ImageTextDataset":
        return cls(pairs=pairs, **kw)

    def __len__(self):
        return len(self.captions) * max(1, len(self.views))

    def _locate(self, j: int):
        j %= len(self)
        view, cap = divmod(j, len(self.captions))
        return j, view, cap, int(self.row_of_caption[cap])

    def _pixels(self, row: int, j: int):
        if row in self._bad_rows:
            return None
        img = load_image(self.images[row], skip_bad=self.skip_bad)
        if img is None:
            self._bad_rows.add(row)
            self.skipped.add(self.images[row])
            return None
        if self.seed is None:
            return self.transform(img)
        with torch.random.fork_rng(devices=[]):  # this sample's own crop: independent of workers and order
            torch.manual_seed(self.seed * 1_000_003 + j)
            return self.transform(img)

    def __getitem__(self, index: int):
        j, view, cap, row = self._locate(index)
        item = {"caption": self.captions[cap], "image_id": int(self.image_ids[cap]), "index": j}
        if self.views:
            item["features"] = self.views[view][row]
        elif self.transform is not None:
            pixels = self._pixels(row, index)
            if pixels is None:
                return None
            item["image"] = pixels
        return item

    def __getitems__(self, indices) -> dict:
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if self.views:
            return self._cached_batch(indices)
        items, skipped = [], 0
        for j in indices.tolist():
            item, tries = self[j], 0
            while item is None:  # unreadable: the next readable sample takes its place
                tries += 1
                if tries > min(MAX_REPLACEMENT_TRIES, len(self)):
                    raise BadImageError(f"no readable image among the {tries} samples from #{j % len(self)} on "
                                        f"(e.g. {self.skipped.bad_files[-1]}): is the image folder there?")
                item = self[j + tries]
            skipped += tries > 0
            items.append(item)
        batch = collate(items)
        batch["num_skipped"] = skipped
        return batch

    def _cached_batch(self, indices: torch.Tensor) -> dict:
        """Cached rows for a whole batch, gathered by index (one indexing op per view present, no per-sample loop)."""
        j = indices % len(self)
        view, cap = j // len(self.captions), j % len(self.captions)
        rows = self.row_of_caption[cap]
        first = self.views[0]
        feats = torch.empty((len(j),) + tuple(first.shape[1:]), dtype=first.dtype)
        for v in view.unique().tolist():
            m = view == v
            feats[m] = self.views[v][rows[m]]
        return {"num_skipped": 0, "caption": [self.captions[c] for c in cap.tolist()],
                "image_id": self.image_ids[cap], "index": j, "features": feats}

    @property
    def collate_fn(self):
        return functools.partial(collate, tokenizer=self.tokenizer, max_len=self.max_len)

    def __getstate__(self):  # to DataLoader workers: memory-mapped banks travel as their file names, not their bytes
        state = dict(self.__dict__)
        state["views"] = [getattr(v, "mmap_path", None) or v for v in self.views]
        return state

    def __setstate__(self, state):
        state["views"] = [open_features(v) if isinstance(v, (str, Path)) else v for v in state["views"]]
        self.__dict__.update(state)


class ImageDataset(torch.utils.data.Dataset):
    """Unique images (e.g. `load_coco(per="image")["image_path"]`) for feature caching and evaluation.
    Item: {"image", "index", "image_path"}; `index` tells which ones survived when skip_bad drops some.
    `crops` (from `view_crops`) applies a fixed crop per image instead of `transform` (cached augmented views)."""

    def __init__(self, image_paths, transform, skip_bad: bool = False, crops=None, img_size: int = 0):
        self.skipped = SkipCounter()
        self.image_paths, self.transform, self.skip_bad = image_paths, transform, skip_bad
        self.crops, self.img_size = crops, img_size

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index: int):
        path = self.image_paths[index]
        img = load_image(path, skip_bad=self.skip_bad)
        if img is None:
            self.skipped.add(path)
            return None
        image = apply_crop(img, self.crops[index], self.img_size) if self.crops is not None else self.transform(img)
        return {"image": image, "index": index, "image_path": _describe(path)}


def collate(batch, tokenizer=None, max_len: int = 32) -> dict | None:
    """Items -> one batch with the same keys: "image"/"features" stacked, "image_id"/"index" as LongTensors,
    strings kept as lists; with a tokenizer also input_ids/attention_mask (see `tokenize`).
    None items (skipped bad images) are dropped and counted in "num_skipped"; if every item was bad
    the whole batch is None, so the training loop should skip it. A batch that is already a dict (from
    `ImageTextDataset.__getitems__`) passes through, tokenised if a tokenizer is given."""
    if isinstance(batch, dict):
        out = batch
    else:
        items = [b for b in batch if b is not None]
        if not items:
            return None
        out = {"num_skipped": len(batch) - len(items)}
        for key in items[0]:
            values = [b[key] for b in items]
            if key in ("image", "features"):
                out[key] = torch.stack(values)
            elif key in ("image_id", "index"):
                out[key] = torch.tensor(values, dtype=torch.long)
            else:
                out[key] = values
    if tokenizer is not None and "caption" in out:
        out.update(tokenize(tokenizer, out["caption"], max_len))
    return out


# ----------------------------------------------------------------------------- from a batch to the model


def open_features(path) -> torch.Tensor:
    """A cached (num_images, tokens, width) float16 bank as a tensor over the memory-mapped file (nothing is
    read until indexed). Copy-on-write: writing to the tensor never changes the file."""
    t = torch.from_numpy(np.load(path, mmap_mode="c"))
    t.mmap_path = str(path)  # DataLoader workers reopen the file by name instead of receiving its bytes
    return t


def resolve_num_workers(dcfg, device) -> int:
    """DataConfig.num_workers, or for None: 0 on a CPU (the training process already uses every core),
    else the CPU cores this process may use, minus one for itself, at most 8."""
    if dcfg.num_workers is not None:
        return int(dcfg.num_workers)
    if torch.device(device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, per_process - 1))


def encode_batch(encoder, batch: dict, device):
    """A batch from the DataLoader -> (image tokens (B, N, D) float32 on `device`, captions, image ids on `device`).
    Cached rows are copied (non_blocking: from pinned memory on a GPU) and cast; uint8 pixels are copied,
    normalised and encoded by the frozen encoder on the device, the whole batch at once."""
    ids = batch["image_id"].to(device, non_blocking=True)
    if "features" in batch:
        return batch["features"].to(device, non_blocking=True).float(), batch["caption"], ids
    pixels = batch["image"].to(device, non_blocking=True)
    if pixels.dtype == torch.uint8:
        pixels = to_model_input(pixels, encoder.mean, encoder.std)
    with torch.no_grad():  # the encoder is frozen: no graph is kept
        return encoder(pixels), batch["caption"], ids
