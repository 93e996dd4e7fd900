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


def scaling_points(sweep: dict) -> dict:
    """The data-scaling curve in results/recipe-sweep.json (scripts/recipe_sweep.py, val split), as
    {metric: {method: {training images: [one value per seed]}}} for metric TR@1, IR@1 (retrieval) and CIDEr
    (captions). At 480 images the Q-Former is the preset's stage 1: preset_s1's seeds and the main job's (rerank_main,
    ranked by ITC)."""
    pts: dict = {}

    def add(metric, method, n, value):
        pts.setdefault(metric, {}).setdefault(method, {}).setdefault(n, []).append(value)

    for key, r in sweep.items():
        name = key.rpartition("/s")[0]
        head, _, n = name.partition("_n")
        if head == "baselines":  # baselines (all 480 images), baselines_n60, ...
            for m in ("TR@1", "IR@1"):
                add(m, "linear probe", int(n or 480), r["linear_probe"][m])
            add("CIDEr", "nearest-neighbour caption", int(n or 480), r["nearest_neighbour"]["CIDEr"])
        elif name in ("n60_s1", "n120_s1", "n240_s1", "preset_s1", "rerank_main"):
            ret = r["k0"] if name == "rerank_main" else r["retrieval_itc"]
            for m in ("TR@1", "IR@1"):
                add(m, "Q-Former", int(name[1:].split("_")[0]) if name[0] == "n" else 480, ret[m])
        elif head == "random_360":  # random_360 (480 images), random_360_n60, ...
            add("CIDEr", "stage 2 from a random Q-Former", int(n or 480), r["val_captions"]["CIDEr"])
    return pts


def data_scaling(sweep: dict, metrics=("TR@1", "IR@1", "CIDEr"), out_png=None):
    """Each method's score against the number of training images: one dot per seed, the line through their means."""
    pts = scaling_points(sweep)
    metrics = [m for m in metrics if m in pts]
    if not metrics:
        raise ValueError("no data-scaling runs in this sweep: run scripts/recipe_sweep.py baselines_n60 n60_s1 "
                         "random_360_n60 ... (and n120, n240) first")
    fig = Figure(figsize=(3.6 * len(metrics), 3), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for method, by_n in pts[metric].items():
            ns = sorted(by_n)
            line, = ax.plot(ns, [sum(by_n[n]) / len(by_n[n]) for n in ns], "-", label=method)
            for n in ns:
                ax.plot([n] * len(by_n[n]), by_n[n], "o", color=line.get_color(), alpha=0.6, ms=4)
        ax.set(xscale="log", xticks=[60, 120, 240, 480], xticklabels=["60", "120", "240", "480"],
               xlabel="training images", ylabel=metric + (" (%)" if "@" in metric else " (x100)"),
               title=f"{metric}, coco-mini val")
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if out_png:
        fig.savefig(out_png, dpi=100)
    return fig


def query_collapse(curves: dict, out_png=None):
    """Where the queries become alike. curves: {label: rows of diagnostics.query_cos_by_layer}. Left: the
    query-query cosine after every sub-layer. Right: how much each self-attention adds to the queries (the norm
    before its residual add and LayerNorm): a large addition shared by every query drowns what tells them apart."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_cos, ax_add = fig.subplots(1, 2, width_ratios=(3, 2))
    for label, rows in curves.items():
        line, = ax_cos.plot(range(len(rows)), [r["query_cos"] for r in rows], "o-", ms=3, label=label)
        selfs = [r for r in rows if r["sublayer"].endswith(".self")]
        ax_add.plot(range(len(selfs)), [r["added"] for r in selfs], "o-", ms=3, color=line.get_color())
    names = [r["sublayer"] for r in next(iter(curves.values()))]
    ax_cos.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    ax_cos.set(ylim=(-0.05, 1.05), ylabel="query-query cosine", title="after each sub-layer (1 = all queries alike)")
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    ax_add.set(yscale="log", xlabel="layer", ylabel="norm added to each query",
               title="what self-attention adds")
    for ax in (ax_cos, ax_add):
        ax.grid(alpha=0.3)
    if out_png:
        fig.savefig(out_png, dpi=100)
    return fig
