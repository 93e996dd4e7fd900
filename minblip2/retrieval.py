"""Image-text retrieval with a stage-1 model, and its metrics (TR@K, IR@K).

BLIP-2's protocol: rank everything by the cheap ITC similarity, then re-rank each query's top-k
candidates by the expensive ITM head (score = ITM "match" logit + ITC similarity).
"""
from __future__ import annotations

import torch

from . import runtime
from .losses import itc_similarities


def _batched(fn, n, batch_size, *tensors):
    return torch.cat([fn(*(t[i:i + batch_size] for t in tensors)) for i in range(0, n, batch_size)])


def _rows_per_chunk(bytes_per_row: int, budget: int) -> int:
    return max(1, budget // max(1, bytes_per_row))


def itc_matrix(img_feats: torch.Tensor, txt_feats: torch.Tensor, budget: int = 1 << 26) -> torch.Tensor:
    """losses.itc_similarities for every (image, text) pair, a few images at a time: the (images, queries,
    texts) intermediate never exceeds `budget` bytes (COCO-5k with 32 queries would be 16 GB at once).
    -> (Ni, Nt) float32."""
    Ni, Q = img_feats.shape[:2]
    out = torch.empty(Ni, len(txt_feats))
    step = _rows_per_chunk(Q * len(txt_feats) * 4, budget)
    for s in range(0, Ni, step):
        out[s:s + step] = itc_similarities(img_feats[s:s + step], txt_feats)
    return out


@torch.no_grad()
def retrieval_scores(model, image_embeds, input_ids, text_mask, k: int = 10, batch_size: int = 128,
                     device="cpu", amp: str = "none", progress: bool = False):
    """Score every (image, text) pair.

    image_embeds (Ni, N, D) frozen image tokens (may be memory-mapped); input_ids/text_mask (Nt, T) all captions.
    Returns (i2t (Ni, Nt), t2i (Nt, Ni), itc (Ni, Nt)), float32. With k > 0 each image's top-k texts (and each
    text's top-k images) are re-ranked by ITM: their score is ITM "match" logit + ITC similarity, plus one
    constant per query row that lifts them above every ITC similarity of that row; the rest keep their ITC
    similarity (and order). Memory: the three (Ni, Nt) results and chunks of bounded size -- COCO-5k
    (5,000 x 25,010) peaks at ~1.6 GB (tests/test_retrieval_memory.py).
    """
    model.eval()
    dev = torch.device(device)
    autocast = runtime.autocast(amp, dev)
    to = lambda x: x.to(dev)  # noqa: E731
    with autocast:
        img_feats = _batched(lambda e: model.encode_image(to(e).float())[0].float().cpu(), len(image_embeds),
                             batch_size, image_embeds)
        txt_feats = _batched(lambda i, m: model.encode_text(to(i), to(m)).float().cpu(), len(input_ids),
                             batch_size, input_ids, text_mask)
    itc = itc_matrix(img_feats, txt_feats)  # (Ni, Nt) cosine similarities
    if k <= 0:
        return itc.clone(), itc.t().contiguous(), itc

    def rerank(sim, query_is_image: bool):
        kk = min(k, sim.shape[1])
        top_sim, top_idx = sim.topk(kk, dim=1)  # (Nq, kk)
        flat = top_idx.reshape(-1)
        itm = torch.empty(flat.numel())
        bar = runtime.progress_bar(range(0, flat.numel(), batch_size), progress, desc="ITM re-rank", leave=False)
        for s in bar:  # pair p = (query p // kk, its (p % kk)-th candidate), batch_size pairs at a time
            p = torch.arange(s, min(s + batch_size, flat.numel()))
            q, c = p // kk, flat[p]
            im, tx = (q, c) if query_is_image else (c, q)
            with autocast:
                logits = model.itm_logits(to(image_embeds[im]).float(), to(input_ids[tx]), to(text_mask[tx]))
            itm[p] = logits[:, 1].float().cpu()
        reranked = itm.view(-1, kk) + top_sim
        lift = (sim.amax(dim=1) - reranked.amin(dim=1) + 1).clamp(min=0)  # re-ranked above all of the row
        scores = sim.clone(memory_format=torch.contiguous_format)  # (sim may be a transposed view)
        scores.scatter_(1, top_idx, reranked + lift.unsqueeze(1))
        return scores

    return rerank(itc, True), rerank(itc.t(), False), itc


def _first_hit_rank(scores: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the first True of `hit` when the row is sorted by score, best first (a stable
    sort: equal scores keep their column order) -- counted, not sorted: O(columns) per row, no index matrix."""
    cols = torch.arange(scores.shape[1])
    best = scores.masked_fill(~hit, float("-inf")).amax(dim=1, keepdim=True)  # the best-scored hit ...
    first = (hit & (scores == best)).float().argmax(dim=1, keepdim=True)  # ... the first such column
    return (scores > best).sum(1) + ((scores == best) & (cols < first)).sum(1)


def recall_at_k(i2t, t2i, text_to_image: torch.Tensor, ks=(1, 5, 10), budget: int = 1 << 25) -> dict[str, float]:
    """TR@K: % of images whose best-ranked ground-truth caption is in the top K (any of its 5 counts).
    IR@K: % of captions whose image is in the top K. text_to_image (Nt,) gives each caption's image row.
    Ranks are counted a few rows at a time (sorting all of COCO-5k at once would take ~2 GB and ~40 s)."""
    Ni, Nt = i2t.shape
    tr_rank, ir_rank = torch.empty(Ni, dtype=torch.long), torch.empty(Nt, dtype=torch.long)
    step = _rows_per_chunk(Nt * 4, budget)
    for s in range(0, Ni, step):
        rows = torch.arange(s, min(s + step, Ni))
        tr_rank[rows] = _first_hit_rank(i2t[rows], text_to_image.unsqueeze(0) == rows.unsqueeze(1))
    step = _rows_per_chunk(Ni * 4, budget)
    for s in range(0, Nt, step):
        rows = torch.arange(s, min(s + step, Nt))
        ir_rank[rows] = _first_hit_rank(t2i[rows], torch.arange(Ni).unsqueeze(0) == text_to_image[rows].unsqueeze(1))
    out = {}
    for k in ks:
        out[f"TR@{k}"] = round(100 * (tr_rank < k).float().mean().item(), 2)
    for k in ks:
        out[f"IR@{k}"] = round(100 * (ir_rank < k).float().mean().item(), 2)
    return out
