"""Three measurements that say what a trained Q-Former does, beyond its scores.

- `query_stats`: do the queries say different things (query-query cosine), and how much of what they say is
  about the particular image (image-specific energy)?
- `cross_attention_stats`: where do the queries look? Attention entropy per cross-attention layer, the
  largest weight, and the weight on token 0 (the ViT's [CLS], the global summary a linear probe reads).
- `query_cos_by_layer`: WHERE do the queries become alike? Their cosine after every sub-layer, and the size
  of what each sub-layer adds to them (a large addition shared by all queries drowns what tells them apart).
- `image_use`: does a stage-2 model read the image? Its caption loss with each image's own tokens against
  the same captions with another image's tokens (a model that ignores the image scores them the same).

Used by scripts/query_diagnostics.py and the sweeps in scripts/; shapes: B images, Q queries, N image tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mean_query_cos(q: torch.Tensor) -> float:
    """(B, Q, H) -> the mean cosine between two different queries of one image (1.0 = all queries alike)."""
    c = F.cosine_similarity(q[:, :, None].float(), q[:, None].float(), dim=-1)
    return round(c[:, ~torch.eye(q.shape[1], dtype=torch.bool)].mean().item(), 3)


@torch.no_grad()
def query_stats(q: torch.Tensor) -> dict[str, float]:
    """q (B, Q, H) query outputs of B images -> mean query-query cosine within an image (1.0 = one vector
    repeated Q times), mean image-image cosine (of the per-image mean), and the share of energy that is NOT
    common to all B images (0 = every image gets the same queries)."""
    q = q.float()
    m = q.mean(1)
    ii = F.cosine_similarity(m[:, None], m[None], dim=-1)[~torch.eye(len(m), dtype=torch.bool)].mean()
    specific = (q - q.mean(0, keepdim=True)).pow(2).sum() / q.pow(2).sum()
    return {"query_cos": mean_query_cos(q), "image_cos": round(ii.item(), 3),
            "image_specific_energy": round(specific.item(), 3)}


@torch.no_grad()
def stage1_query_stats(model, image_tokens: torch.Tensor) -> dict[str, float]:
    """query_stats of a Stage1Model's query outputs for frozen image tokens (B, N, Dv), in eval mode."""
    model.eval()
    return query_stats(model.encode_image(image_tokens.float())[1])


def _run_queries(qformer, image_tokens, hook_handles):
    """One eval-mode pass of the queries over image_tokens for the hooks; removes them, restores the mode."""
    was_training = qformer.training
    qformer.eval()
    try:
        qformer(image_tokens)
    finally:
        for h in hook_handles:
            h.remove()
        qformer.train(was_training)


@torch.no_grad()
def cross_attention_stats(qformer, image_tokens: torch.Tensor) -> list[dict[str, float]]:
    """Run the Q-Former's queries on image_tokens (B, N, Dv), already through ln_vision, and return per
    cross-attention layer: mean entropy of the queries' attention over the N tokens (uniform = log N), mean
    largest weight (uniform = 1/N), mean weight on token 0 ([CLS])."""
    stats = []

    def hook(attn, args, kwargs, out):
        q = attn.split(attn.query(args[0]))
        k = kwargs["kv"][0] if kwargs.get("kv") is not None else attn.split(attn.key(kwargs["context"]))
        a = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)  # (B, heads, Q, N)
        stats.append({"entropy": round(-(a * a.clamp_min(1e-12).log()).sum(-1).mean().item(), 2),
                      "uniform_entropy": round(math.log(a.shape[-1]), 2),
                      "max_weight": round(a.amax(-1).mean().item(), 4),
                      "cls_weight": round(a[..., 0].mean().item(), 4)})

    layers = [layer.cross_attn for layer in qformer.layers if layer.cross_attn is not None]
    _run_queries(qformer, image_tokens, [attn.register_forward_hook(hook, with_kwargs=True) for attn in layers])
    return stats


@torch.no_grad()
def query_cos_by_layer(qformer, image_tokens: torch.Tensor) -> list[dict]:
    """Run the Q-Former's queries on image_tokens (B, N, Dv), already through ln_vision, and return one row per
    sub-layer ("L0.self", "L0.cross", "L0.ffn", ...): the mean query-query cosine after it (its residual add and
    LayerNorm included), and `added` (the mean norm of what it adds to each query before the LayerNorm) with
    `added_cos` (how alike those additions are across the queries; 1.0 = the same vector for every query)."""
    rows, added = [], {}

    def keep_added(name):
        def hook(mod, args, out):
            added[name] = {"added": round(out.norm(dim=-1).mean().item(), 2), "added_cos": mean_query_cos(out)}
        return hook

    def keep_output(name):
        def hook(mod, args, out):
            out = out[0] if isinstance(out, tuple) else out  # attention returns (output, its keys/values)
            rows.append({"sublayer": name, "query_cos": mean_query_cos(out), **added[name]})
        return hook

    handles = []
    for i, layer in enumerate(qformer.layers):
        for kind, mod in (("self", layer.self_attn), ("cross", layer.cross_attn), ("ffn", layer.query_ffn)):
            if mod is not None:
                last = mod.fc2 if kind == "ffn" else mod.out  # the sub-layer's output, before residual + norm
                handles += [last.register_forward_hook(keep_added(f"L{i}.{kind}")),
                            mod.register_forward_hook(keep_output(f"L{i}.{kind}"))]
    _run_queries(qformer, image_tokens, handles)
    return rows


@torch.no_grad()
def image_use(model, image_tokens: torch.Tensor, captions: list[str], batch_size: int = 16) -> dict[str, float]:
    """A Stage2Model's mean caption loss with the right images, and with the images rolled by one (each caption
    paired with another image). `gap` = shuffled - matched: how many nats the image is worth to the model.
    Call it under the autocast the model trained with (a bf16 LLM expects it)."""
    was_training = model.training
    model.eval()
    n = len(captions)
    other = torch.roll(torch.arange(n), 1)
    out = {}
    for name, feats in [("matched", image_tokens), ("shuffled", image_tokens[other])]:
        total = 0.0
        for i in range(0, n, batch_size):
            caps = captions[i:i + batch_size]
            total += model(feats[i:i + batch_size].float(), caps)["loss"].item() * len(caps)
        out[name] = round(total / n, 3)
    model.train(was_training)
    out["gap"] = round(out["shuffled"] - out["matched"], 3)
    return out


def saved_for_backward_bytes(fn) -> int:
    """The bytes of the tensors autograd keeps for backward while fn() runs (outside checkpointed regions: a
    checkpoint keeps its inputs and recomputes the rest). Lesson 8 writes the same hook out by hand."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total

