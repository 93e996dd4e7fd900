"""What every lesson imports first (the kernel runs in lessons/, so this file is importable as `course`).

    import course                        # quiet warnings, small figures, torch seeded with 0
    from course import show_coco, run_check

Importing it silences tqdm's "IProgress not found" warning (without ipywidgets tqdm draws a text bar, on stderr:
only the cells that fill the feature cache show one, on a first run) and Hugging Face's download bars, sets matplotlib's figure dpi to 72 (small stored notebooks) and seeds torch with 0.

COCO photos and human captions are not ours to republish, so no stored notebook may contain them. Every cell that
shows them calls `show_coco` and carries the cell tag `coco-data`: `scripts/execute_lessons.py` runs such a cell
like any other but stores the notebook with that cell's outputs cleared, so you see the pictures when you run a
lesson and git never does. `tests/test_lessons_clean.py` checks both rules (and that no caption is stored anywhere).
"""
from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from tqdm import TqdmWarning

warnings.filterwarnings("ignore", category=TqdmWarning)  # "IProgress not found": a text bar does as well
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
plt.rcParams.update({"figure.dpi": 72})
torch.manual_seed(0)

COCO_TAG = "coco-data"  # the cell tag of every cell that displays COCO data (see the module docstring)


def _as_array(image):
    """A path, a PIL image, or a (3, H, W) / (H, W, 3) tensor with values in [0, 1] -> something imshow takes."""
    if isinstance(image, (str, Path)):
        from PIL import Image
        return Image.open(image).convert("RGB")
    if torch.is_tensor(image):
        image = image.detach().float().cpu()
        return (image.permute(1, 2, 0) if image.shape[0] == 3 else image).clamp(0, 1).numpy()
    return image


def show_coco(images, captions=None, titles=None, ncols: int = 4, title: str = "coco-mini", width: int = 34):
    """Show COCO images in a grid, each with its caption(s) under it. Call it only from a cell tagged `coco-data`.

    images: paths, PIL images or (3, H, W) tensors in [0, 1]; captions: one string or a list of strings per image;
    titles: one short line above each image (e.g. its image_id).
    """
    images = list(images)
    captions = [None] * len(images) if captions is None else [[c] if isinstance(c, str) else list(c) for c in captions]
    wrapped = ["\n".join("\n".join(textwrap.wrap("- " + c, width)) for c in caps) if caps else "" for caps in captions]
    lines = max(t.count("\n") + 1 if t else 0 for t in wrapped)
    nrows, text_h = -(-len(images) // ncols), 0.14 * lines + 0.05  # text_h: inches of caption under each row
    fig = plt.figure(figsize=(2.6 * ncols, nrows * (2.75 + text_h) + 0.3), layout="constrained")
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[2.4, text_h] * nrows)
    for k, image in enumerate(images):
        r, c = divmod(k, ncols)
        ax, below = fig.add_subplot(grid[2 * r, c]), fig.add_subplot(grid[2 * r + 1, c])
        ax.imshow(_as_array(image))
        ax.axis("off")
        below.axis("off")
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=8)
        below.text(0, 1, wrapped[k], fontsize=7, ha="left", va="top", transform=below.transAxes)  # its caption(s)
    fig.suptitle(title, fontsize=10)
    plt.show()


def run_check(check, *answer):
    """Run an exercise's check on your answer. A check is plain asserts: a wrong answer stops with its message.
    An answer still raising NotImplementedError (the exercise's starting point) is reported as not attempted."""
    try:
        check(*answer)
    except NotImplementedError:
        print(f"{check.__name__}: not attempted yet -- write your answer in the cell above, then run this one again")
    else:
        print(f"{check.__name__}: all checks pass")
