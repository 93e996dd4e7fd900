"""Compute the frozen image encoder's tokens once and cache them on disk.

The image encoder is frozen, so without augmentation its output for an image never changes: computing
it once instead of every epoch is the biggest saving on a CPU (the ViT forward costs more than the whole
Q-Former step). The price would be no random crops/flips during training, and on a few hundred images
the Q-Former then overfits within a few epochs. So the cache can also hold a few augmented VIEWS of each
image (`DataConfig.augmented_views`: random crop + flip, fixed once, each computed with its own seed);
training samples cycle through them. `TrainConfig.cache_features=False` augments afresh at every step.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from . import dist
from .config import VisionConfig, default_cache_dir
from .data import ImageDataset, eval_transform, train_transform


def cache_key(vcfg: VisionConfig, image_paths: list[str], view: int = 0) -> str:
    h = hashlib.sha256()
    h.update(f"{vcfg.name}|{vcfg.weights}|{vcfg.img_size}|{vcfg.drop_last_block}".encode())
    if view:
        h.update(f"|augmented view {view}".encode())
    for p in image_paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(encoder, image_paths: list[str], batch_size: int = 32, device="cpu", amp: str = "none",
                  progress: bool = True, view: int = 0) -> torch.Tensor:
    """Run the frozen encoder over images -> (N, tokens, width) float16 on the CPU.

    view 0: the eval transform (resize + center crop); view v > 0: the training augmentation, its random
    crops drawn from seed v (the same view every time it is computed). Every image must be readable (a bad
    one raises BadImageError naming the file): rows must stay aligned with `image_paths`."""
    make = train_transform if view else eval_transform
    ds = ImageDataset(image_paths, make(encoder.img_size, encoder.mean, encoder.std))
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=_stack)
    out = []
    with torch.random.fork_rng(devices=[]):  # the crops' seed must not disturb the caller's random state
        torch.manual_seed(view)
        for images in dist.progress_bar(dl, progress, desc=f"image features (view {view})" if view else "image features"):
            with dist.autocast(amp, device):
                out.append(encoder(images.to(device)).float().half().cpu())
    return torch.cat(out)


def _stack(batch):
    return torch.stack([b["image"] for b in batch])


def cached_features(encoder, vcfg: VisionConfig, image_paths: list[str], cache_dir=None, view: int = 0,
                    **kw) -> torch.Tensor:
    """Features for `image_paths` (view 0 = center crop, v > 0 = augmented view v, see encode_images) from
    the cache, computing (on rank 0) and saving them atomically if absent."""
    cache_dir = Path(cache_dir or default_cache_dir()) / "features"
    path = cache_dir / f"{vcfg.name}-{vcfg.img_size}-{cache_key(vcfg, image_paths, view)}.safetensors"
    if not path.exists() and dist.is_master():
        feats = encode_images(encoder, image_paths, view=view, **kw)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"features": feats.contiguous()}, str(tmp))
        os.replace(tmp, path)  # atomic: a reader never sees a half-written file
    dist.barrier()
    return load_file(str(path))["features"]
