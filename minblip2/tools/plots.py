"""Pictures a person would rather look at than read: loss curves, captioned image grids, retrieval results."""
from __future__ import annotations

import csv
import textwrap

# matplotlib's object-oriented Figure, not pyplot: no global backend or figure state is touched, so importing this
# (train() does) changes nothing in a notebook, and a headless machine needs no display. Notebooks show the
# returned Figure like any other.
from matplotlib.figure import Figure


def plot_losses(log_csv, out_png=None, title: str = "", smooth: int = 10):
    """Every `loss*` column of a training log against the step (raw, faint; moving average, solid)."""
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k.startswith("loss")]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    steps = [float(r["step"]) for r in rows]
    for k in keys:
        ys = [float(r[k]) for r in rows if r.get(k) not in (None, "")]
        line, = ax.plot(steps[:len(ys)], ys, alpha=0.25)
        w = max(1, min(smooth, len(ys) // 5 or 1))
        avg = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(steps[:len(ys)], avg, color=line.get_color(), label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if out_png:
        fig.savefig(out_png, dpi=100)
    return fig


def caption_grid(image_paths, generated, references=None, out_png=None, cols: int = 4, img_size: int = 160):
    """Images with the generated caption and, after a dash, one reference caption above each (each cut to a
    few lines, so a rambling caption cannot run over the picture above it)."""
    from PIL import Image

    n = len(image_paths)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(cols * 2.6, rows * 3.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, path in enumerate(image_paths):
        ax = axes.flat[i]
        ax.imshow(Image.open(path).convert("RGB").resize((img_size, img_size)))
        text = "\n".join(textwrap.wrap(generated[i], 32, max_lines=3, placeholder=" ..."))
        if references:
            text += "\n— " + "\n".join(textwrap.wrap(references[i], 32, max_lines=2, placeholder=" ..."))
        ax.set_title(text, fontsize=7, loc="left")
    fig.tight_layout()
    if out_png:
        fig.savefig(out_png, dpi=90)
    return fig


def retrieval_examples(queries, ranked_paths, correct, out_png=None, k: int = 5, img_size: int = 120):
    """Text -> image search results: one row per query caption, its top-k images, the right one framed green."""
    from PIL import Image

    fig = Figure(figsize=(k * 1.8, len(queries) * 2.0))
    axes = fig.subplots(len(queries), k, squeeze=False)
    for r, q in enumerate(queries):
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(Image.open(ranked_paths[r][c]).convert("RGB").resize((img_size, img_size)))
            ax.set_xticks([])
            ax.set_yticks([])
            color = "green" if correct[r][c] else "lightgray"
            for s in ax.spines.values():
                s.set_edgecolor(color)
                s.set_linewidth(3 if correct[r][c] else 1)
        axes[r, 0].set_ylabel("\n".join(textwrap.wrap(q, 22)), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    if out_png:
        fig.savefig(out_png, dpi=90)
    return fig
