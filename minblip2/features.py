"""Compute the frozen image encoder's tokens once and cache them on disk.

The image encoder is frozen, so without augmentation its output for an image never changes: computing
it once instead of every epoch is the biggest saving on a CPU (the ViT forward costs more than the whole
Q-Former step). The price would be no random crops/flips during training, and on a few hundred images
the Q-Former then overfits within a few epochs. So the cache can also hold a few augmented VIEWS of each
image (`DataConfig.augmented_views`: random crop + flip, fixed once, each drawn from its own seed);
training samples cycle through them. `TrainConfig.cache_features=False` augments afresh at every step.

On disk (format v2): one float16 `.npy` file per view, (num_images, tokens, width), read memory-mapped: a
batch reads only its rows, and no process holds the whole bank in RAM (COCO's train split through ViT-g is
~82 GB per view). Under DDP every process encodes its own share of the images, with DataLoader workers
decoding, straight into the one shared file; with node-local cache directories (many nodes, no shared
filesystem), each node's processes into that node's own copy (`dist.processes_sharing` finds out which
processes see the same directory). (v1, `<name>-<size>-<key>.safetensors`, was written by rank 0 alone and
loaded whole into every process; v2 files have another name, so a v1 file is never misread.)
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import dist, runtime
from .config import VisionConfig, default_cache_dir
from .data import BadImageError, ImageDataset, eval_transform, image_size, open_features, to_model_input, view_crops

FORMAT = "v2"


def cache_key(vcfg: VisionConfig, image_paths, view: int = 0) -> str:
    h = hashlib.sha256()
    h.update(f"{vcfg.name}|{vcfg.weights}|{vcfg.img_size}|{vcfg.drop_last_block}".encode())
    if view:
        h.update(f"|augmented view {view}".encode())
    for p in image_paths:
        if isinstance(p, (str, os.PathLike)):
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}".encode())
        else:  # an image stored in a dataset ({"bytes", "path"} or bytes): its size and a digest of its ends
            b = p.get("bytes") or b"" if isinstance(p, dict) else bytes(p)
            h.update(f"{p.get('path') if isinstance(p, dict) else ''}|{len(b)}|".encode() + b[:4096] + b[-4096:])
    return h.hexdigest()[:16]


def feature_path(vcfg: VisionConfig, image_paths, view: int = 0, cache_dir=None) -> Path:
    cache_dir = Path(cache_dir or default_cache_dir()) / "features"
    return cache_dir / f"{vcfg.name}-{vcfg.img_size}-{cache_key(vcfg, image_paths, view)}.{FORMAT}.npy"


class _Rows:
    """images[lo:hi] without copying a lazy column."""

    def __init__(self, images, lo, hi):
        self.images, self.lo, self.hi = images, lo, hi

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.images[self.lo + i]


def _stack(batch):
    return torch.stack([b["image"] for b in batch])


def _feature_shape(encoder, device) -> tuple[int, int]:
    if hasattr(encoder, "num_tokens") and hasattr(encoder, "num_features"):
        return encoder.num_tokens, encoder.num_features
    x = torch.zeros(1, 3, encoder.img_size, encoder.img_size, device=device)
    return tuple(encoder(x).shape[1:])


@torch.no_grad()
def _encode_rows(encoder, images, lo: int, hi: int, out, view: int, batch_size: int, device, amp: str,
                 progress: bool, num_workers: int):
    """Encode images[lo:hi] into out[lo:hi] (a numpy array: in memory or memory-mapped), batch by batch."""
    if hi <= lo:
        return
    device = torch.device(device)
    crops = None
    if view:  # the crops depend on every earlier image's size (one random stream): draw them up to hi
        crops = view_crops([image_size(images[i]) for i in range(hi)], view, encoder.img_size)[lo:hi]
    ds = ImageDataset(_Rows(images, lo, hi), eval_transform(encoder.img_size, encoder.mean, encoder.std, normalize=False),
                      crops=crops, img_size=encoder.img_size)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=_stack, num_workers=num_workers,
                    pin_memory=device.type == "cuda", generator=torch.Generator())  # own generator: the caller's RNG is untouched
    pos = lo
    desc = f"image features (view {view})" if view else "image features"
    try:
        for pixels in runtime.progress_bar(dl, progress, desc=desc):
            x = to_model_input(pixels.to(device, non_blocking=True), encoder.mean, encoder.std)
            with runtime.autocast(amp, device):
                out[pos:pos + len(x)] = encoder(x).float().half().cpu().numpy()
            pos += len(x)
    except BadImageError as e:  # (from a worker, the message holds the worker's traceback: keep the one line)
        what = next((line for line in str(e).splitlines() if "cannot read image" in line), str(e))
        what = what.split("BadImageError: ")[-1].split(". To skip")[0]
        raise BadImageError(f"{what}. The feature cache needs every image: replace or remove that file, or train "
                            f"without the cache (--stage1.cache_features=False; there --data.skip_bad_images=True "
                            f"replaces unreadable images, counted in log.csv)") from e


def encode_images(encoder, image_paths, batch_size: int = 32, device="cpu", amp: str = "none",
                  progress: bool = True, view: int = 0, num_workers: int = 0) -> torch.Tensor:
    """Run the frozen encoder over images -> (N, tokens, width) float16 on the CPU, in memory.

    view 0: the eval transform (resize + center crop); view v > 0: the training augmentation, its random
    crops drawn from seed v (the same view every time it is computed, see data.view_crops). Every image must be
    readable (a bad one raises BadImageError naming the file): rows must stay aligned with `image_paths`."""
    n = len(image_paths)
    out = np.empty((n, *_feature_shape(encoder, device)), dtype=np.float16)
    _encode_rows(encoder, image_paths, 0, n, out, view, batch_size, device, amp, progress, num_workers)
    return torch.from_numpy(out)


def cached_features(encoder, vcfg: VisionConfig, image_paths, cache_dir=None, view: int = 0, batch_size: int = 32,
                    device="cpu", amp: str = "none", progress: bool = True, num_workers: int = 0) -> torch.Tensor:
    """Features for `image_paths` (view 0 = center crop, v > 0 = augmented view v, see encode_images) from
    the cache, memory-mapped (see open_features). If absent, the processes that share the cache directory encode
    their shares of the images into one file (the first of them creates it, then renames it into place once all
    are done: atomic). On a shared filesystem that is every process; on node-local disks (many nodes, no shared
    filesystem) each node writes its own copy, its processes splitting the images among themselves."""
    path = feature_path(vcfg, image_paths, view, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = dist.processes_sharing(path.parent)  # who sees this directory as I do (see dist.processes_sharing)
    missing = dist.all_gather_object(not path.exists())  # every process takes part in the barriers below
    if any(missing):
        n, leader = len(image_paths), group[0]
        share, size = group.index(dist.rank()), len(group)
        token = dist.broadcast_object(f"{os.getpid()}-{time.time_ns()}")
        tmp = path.with_name(f".{path.name}.{token}-{leader}.partial")  # one file per group
        encode = missing[dist.rank()]
        shape = (n, *_feature_shape(encoder, device)) if encode else None
        if encode and dist.rank() == leader:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape).flush()  # a sparse file
        dist.barrier()
        if encode:
            out = np.load(tmp, mmap_mode="r+")
            _encode_rows(encoder, image_paths, n * share // size, n * (share + 1) // size, out, view, batch_size,
                         device, amp, progress, num_workers)
            out.flush()
            del out
        dist.barrier()
        if encode and dist.rank() == leader:
            os.replace(tmp, path)  # atomic: a reader never sees a half-written file
        dist.barrier()
    return open_features(path)
