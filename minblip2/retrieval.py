"""Image-text retrieval with a stage-1 model, and its metrics (TR@K, IR@K).

BLIP-2's protocol: rank everything by the cheap ITC similarity, then re-rank each query's top-k
candidates by the expensive ITM head (score = ITM "match" logit + ITC similarity).
"""
from __future__ import annotations

import torch

from . import dist
from .losses import itc_similarities


def _batched(fn, n, batch_size, *tensors):
    return torch.cat([fn(*(t[i:i + batch_size] for t in tensors)) for i in range(0, n, batch_size)])


@torch.no_grad()
def retrieval_scores(model, image_embeds, input_ids, text_mask, k: int = 10, batch_size: int = 128,
                     device="cpu", amp: str = "none", progress: bool = False):
    """Score every (image, text) pair.

    image_embeds (Ni, N, D) frozen image tokens; input_ids/text_mask (Nt, T) all captions.
    Returns (i2t (Ni, Nt), t2i (Nt, Ni), itc (Ni, Nt)). With k > 0 each image's top-k texts (and each
    text's top-k images) get ITM + ITC scores; the rest keep their ITC order, below all re-ranked ones.
    """
    model.eval()
    dev = torch.device(device)
    autocast = dist.autocast(amp, dev)
    to = lambda x: x.to(dev)  # noqa: E731
    with autocast:
        img_feats = _batched(lambda e: model.encode_image(to(e).float())[0].float().cpu(), len(image_embeds),
                             batch_size, image_embeds)
        txt_feats = _batched(lambda i, m: model.encode_text(to(i), to(m)).float().cpu(), len(input_ids),
                             batch_size, input_ids, text_mask)
    itc = itc_similarities(img_feats, txt_feats)  # (Ni, Nt) cosine similarities
    if k <= 0:
        return itc.clone(), itc.t().clone(), itc

    def rerank(sim, query_is_image: bool):
        scores = sim.double() - 1e4  # keep ITC order below the re-ranked top-k (float64: in float32, -1e4
        # rounds to steps of ~1e-3 and would tie or swap close similarities)
        kk = min(k, sim.shape[1])
        top_sim, top_idx = sim.topk(kk, dim=1)
        pairs = [(q, c) for q in range(sim.shape[0]) for c in top_idx[q].tolist()]
        out = []
        bar = dist.progress_bar(range(0, len(pairs), batch_size), progress, desc="ITM re-rank", leave=False)
        for s in bar:
            chunk = pairs[s:s + batch_size]
            im = torch.tensor([q if query_is_image else c for q, c in chunk])
            tx = torch.tensor([c if query_is_image else q for q, c in chunk])
            with autocast:
                logits = model.itm_logits(to(image_embeds[im]).float(), to(input_ids[tx]), to(text_mask[tx]))
            out.append(logits[:, 1].float().cpu())
        itm = torch.cat(out).view(sim.shape[0], kk)
        scores.scatter_(1, top_idx, (itm + top_sim).double())
        return scores

    return rerank(itc, True), rerank(itc.t(), False), itc


def recall_at_k(i2t, t2i, text_to_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """TR@K: % of images whose best-ranked ground-truth caption is in the top K (any of its 5 counts).
    IR@K: % of captions whose image is in the top K. text_to_image (Nt,) gives each caption's image row."""
    Ni = i2t.shape[0]
    order = i2t.argsort(dim=1, descending=True)  # (Ni, Nt) text indices, best first
    is_gt = text_to_image[order] == torch.arange(Ni).unsqueeze(1)
    tr_rank = is_gt.float().argmax(dim=1)  # position of the first ground-truth caption
    order = t2i.argsort(dim=1, descending=True)  # (Nt, Ni)
    ir_rank = (order == text_to_image.unsqueeze(1)).float().argmax(dim=1)
    out = {}
    for k in ks:
        out[f"TR@{k}"] = round(100 * (tr_rank < k).float().mean().item(), 2)
    for k in ks:
        out[f"IR@{k}"] = round(100 * (ir_rank < k).float().mean().item(), 2)
    return out
