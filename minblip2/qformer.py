"""The Q-Former: a BERT whose sequence starts with learned queries that cross-attend to the image.

    image tokens (B, N, Dv) ─────────────┐ (keys/values of cross-attention, every `cross_attention_freq`-th layer)
                                         v
    [queries (B,Q,H) | text (B,T,H)] -> self-attention (shared, masked: see masks.py)
                                     -> queries: cross-attention -> query FFN
                                     -> text:                       text FFN
    ... num_layers times ...         -> (B, Q+T, H)

Queries and text share the self-attention weights; each has its own feed-forward (the query FFN starts
as a copy of BERT's). Everything is initialised from a BERT checkpoint except the queries and the
cross-attention, which are new. Shapes use B batch, Q queries, T text tokens, H hidden, N image tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from .config import QFormerConfig, check_qformer_config
from . import masks


class Attention(nn.Module):
    """Multi-head attention followed by BERT's output block: dense -> dropout -> residual -> LayerNorm."""

    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float, eps: float, impl: str = "sdpa"):
        super().__init__()
        if hidden % heads:  # QFormer checks its config first, with the flag names; this guards direct use
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} attention heads")
        if impl not in ("sdpa", "math"):
            raise ValueError(f"qformer.attn_impl must be 'sdpa' or 'math', not {impl!r}")
        self.heads, self.dropout, self.impl = heads, dropout, impl
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def split(self, x):  # (B, L, H) -> (B, heads, L, H/heads)
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def project_kv(self, ctx):
        """(B, N, Dkv) -> keys, values (B, heads, N, H/heads)."""
        return self.split(self.key(ctx)), self.split(self.value(ctx))

    def forward(self, x, context=None, mask=None, prefix_kv=None, kv=None, causal=False):
        """x (B, L, H); context (B, N, Dkv) for cross-attention, else x; mask (B, L, keys) bool, True = attend.

        kv: keys/values already projected from the context (`project_kv`), instead of the context itself.
        prefix_kv: keys/values (B, heads, P, d) computed earlier (the queries', for ITG) prepended to this
        pass's own. causal: instead of a mask, row i attends to the keys up to its own position counted from
        the END (all P prefix keys, then keys 0..i of this pass): no mask tensor, so on a GPU SDPA can pick
        FlashAttention, which takes no boolean mask. Returns the output and this pass's own (k, v).
        """
        q = self.split(self.query(x))
        k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        own_kv = (k, v)
        if prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        if mask is not None:
            mask = mask.unsqueeze(1)  # (B, 1, L, keys): the same mask for every head
        p = self.dropout if self.training else 0.0
        if causal:
            if mask is not None:
                raise ValueError("pass either a mask or causal=True, not both")
            L, S = q.shape[2], k.shape[2]
            mask = (causal_lower_right(L, S) if self.impl == "sdpa"  # SDPA reads it as a kernel option
                    else torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L))
        if self.impl == "sdpa":  # PyTorch's fused kernels (FlashAttention on GPUs, when there is no mask tensor)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:  # the same math written out: on CPU, training with attention dropout is faster this way (bench/)
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            a = F.dropout(scores.softmax(dim=-1), p, self.training) @ v
        a = a.transpose(1, 2).reshape(x.shape)  # (B, L, H)
        return self.norm(x + self.drop(self.out(a))), own_kv


class FeedForward(nn.Module):
    """BERT's feed-forward: dense -> GELU -> dense -> dropout -> residual -> LayerNorm."""

    def __init__(self, hidden: int, inner: int, dropout: float, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool, with_text: bool = True):
        super().__init__()
        H, p, eps = cfg.hidden_size, cfg.dropout, cfg.layer_norm_eps
        self.self_attn = Attention(H, cfg.num_heads, H, p, eps, cfg.attn_impl)
        self.cross_attn = (Attention(H, cfg.num_heads, cfg.vision_width, p, eps, cfg.attn_impl)
                           if has_cross_attention else None)
        self.query_ffn = FeedForward(H, cfg.intermediate_size, p, eps)
        self.text_ffn = FeedForward(H, cfg.intermediate_size, p, eps) if with_text else None

    def forward(self, x, mask, num_queries: int, image_embeds=None, prefix_kv=None, image_kv=None, causal=False):
        """x (B, Q+T, H) with the first `num_queries` rows the queries (0 if they are cached in prefix_kv);
        image_embeds (B, N, Dv) the image tokens, or image_kv: their keys/values in this layer, computed before.
        causal: self-attention is causal instead of masked (see Attention.forward)."""
        h, kv = self.self_attn(x, mask=mask, prefix_kv=prefix_kv, causal=causal)
        parts = []
        if num_queries > 0:
            hq = h[:, :num_queries]
            if self.cross_attn is not None:
                hq, _ = self.cross_attn(hq, context=image_embeds, kv=image_kv)  # queries read the image
            parts.append(self.query_ffn(hq))
        if h.shape[1] > num_queries:
            parts.append(self.text_ffn(h[:, num_queries:]))
        return torch.cat(parts, dim=1), kv


class QFormer(nn.Module):
    """with_text=False builds only the query path (stage 2 needs no text embeddings or text FFNs)."""

    def __init__(self, cfg: QFormerConfig, with_text: bool = True):
        super().__init__()
        check_qformer_config(cfg)
        self.cfg = cfg
        H = cfg.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, H))
        if with_text:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, H)  # text only: queries have none
        self.embed_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)  # shared by queries and text
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, has_cross_attention=(i % cfg.cross_attention_freq == 0), with_text=with_text)
            for i in range(cfg.num_layers)
        )
        self.apply(init_bert_weights)
        nn.init.normal_(self.query_tokens, std=cfg.query_init_std)

    def embed(self, batch_size: int, with_queries: bool, input_ids=None):
        parts = []
        if with_queries:
            parts.append(self.query_tokens.expand(batch_size, -1, -1))
        if input_ids is not None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # text positions start at 0
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(pos))
        return self.embed_drop(self.embed_norm(torch.cat(parts, dim=1)))

    def image_kv(self, image_embeds):
        """Image tokens (B, N, Dv) -> each layer's cross-attention (keys, values), None for layers without.

        They depend on the image alone: a batch computes them once for every pass that reads the same
        images (stage 1: ITC and ITM), instead of once per pass.
        """
        return [layer.cross_attn.project_kv(image_embeds) if layer.cross_attn is not None else None
                for layer in self.layers]

    def forward(self, image_embeds=None, input_ids=None, text_mask=None, mask=None, query_cache=None,
                return_cache=False, image_kv=None, causal=False):
        """Run queries and/or text through the Q-Former.

        The paper's recipe needs only image_embeds, input_ids, text_mask and mask (Stage1Model.plain_losses, stage 2);
        image_kv, query_cache, return_cache and causal let Stage1Model.fast_losses share work between its passes.

        image_embeds: (B, N, Dv) -- the queries are in the sequence iff this (or image_kv) is given.
        image_kv: the image's cross-attention keys/values from `image_kv(image_embeds)`, instead of image_embeds.
        input_ids, text_mask: (B, T) text tokens and their "is real, not padding" mask (1/0).
        mask: the (Q+T, Q+T) objective mask from masks.py; None = everything attends to everything.
        query_cache: the queries' per-layer (k, v) from an earlier pass with `return_cache=True`: the text
            then attends to those keys without the queries being recomputed (valid for ITG, where the
            queries never look at the text, so their states are the same as in the ITC pass).
        causal: with a query_cache only -- ITG's multimodal causal mask without a mask tensor: each text token
            sees every cached query and the text up to itself. Pads need no mask there, as long as the text is
            RIGHT-padded (as `data.tokenize` pads): a real token never looks forward, so never at a pad; the pads'
            own outputs change but predict nothing (the ITG loss ignores them). With no mask tensor SDPA may use
            FlashAttention on a GPU (it takes no boolean mask).
        Returns hidden states (B, Q+T, H) -- (B, T, H) with a query_cache -- and, with return_cache, the
        per-layer (k, v) of this pass.
        """
        with_queries = image_embeds is not None or image_kv is not None
        if image_embeds is not None:
            B = image_embeds.shape[0]
        else:  # layer 0 always has cross-attention
            B = image_kv[0][0].shape[0] if image_kv is not None else input_ids.shape[0]
        Q = self.cfg.num_queries if with_queries else 0
        P = query_cache[0][0].shape[2] if query_cache is not None else 0  # cached query count
        x = self.embed(B, with_queries, input_ids)

        attn_mask = None
        if causal:
            if query_cache is None or mask is not None:
                raise ValueError("causal=True is ITG's mask for text after cached queries: pass query_cache, no mask")
        elif input_ids is not None:  # text present: build (B, rows, keys) from the objective mask + padding
            T = input_ids.shape[1]
            n_q = Q + P
            if mask is None:
                mask = masks.bidirectional_mask(n_q, T, device=x.device)
            if text_mask is None:
                text_mask = torch.ones_like(input_ids)
            keep = torch.cat([torch.ones(B, n_q, dtype=torch.bool, device=x.device), text_mask.bool()], dim=1)
            attn_mask = masks.with_padding(mask, keep)[:, P:]  # with a cache only the text rows are computed
        elif mask is not None:
            attn_mask = mask.unsqueeze(0).expand(B, -1, -1)

        cache = []
        for i, layer in enumerate(self.layers):
            prefix = query_cache[i] if query_cache is not None else None
            ikv = image_kv[i] if image_kv is not None else None
            # gradient checkpointing: whenever a backward will follow, also in eval mode (stage 1's dropout-free
            # query pass runs in it). Keys/values: image_embeds go into the layer as they are, so their keys/values
            # are recomputed in backward; image_kv (fast_losses) were computed once before the layers, and those
            # are kept for backward -- checkpointing does not free them
            if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
                # the recomputation in backward runs in the mode of this forward (passed along), not in whatever
                # mode the model is in by then: the dropout-free pass is back in training mode when backward comes
                x, kv = checkpoint(_run_in_mode, layer, layer.training, x, attn_mask, Q, image_embeds, prefix, ikv,
                                   causal, use_reentrant=False)
            else:
                x, kv = layer(x, attn_mask, Q, image_embeds, prefix, ikv, causal)
            cache.append(kv)
        return (x, cache) if return_cache else x


def _run_in_mode(layer: nn.Module, training: bool, *args):
    """layer(*args) with dropout on or off as `training` says, the layer's own mode restored after."""
    was = layer.training
    layer.train(training)
    try:
        return layer(*args)
    finally:
        layer.train(was)


def init_bert_weights(module: nn.Module):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, LayerNorm = identity."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def bert_to_qformer_keys(num_layers: int) -> dict[str, list[str]]:
    """HF BertModel key -> the Q-Former keys it initialises (BERT's FFN goes to BOTH the text and query FFNs)."""
    m = {
        "embeddings.word_embeddings.weight": ["word_embeddings.weight"],
        "embeddings.position_embeddings.weight": ["position_embeddings.weight"],
        "embeddings.LayerNorm.weight": ["embed_norm.weight"],
        "embeddings.LayerNorm.bias": ["embed_norm.bias"],
    }
    for i in range(num_layers):
        b, q = f"encoder.layer.{i}.", f"layers.{i}."
        for wb in ("weight", "bias"):
            for n in ("query", "key", "value"):
                m[f"{b}attention.self.{n}.{wb}"] = [f"{q}self_attn.{n}.{wb}"]
            m[f"{b}attention.output.dense.{wb}"] = [f"{q}self_attn.out.{wb}"]
            m[f"{b}attention.output.LayerNorm.{wb}"] = [f"{q}self_attn.norm.{wb}"]
            m[f"{b}intermediate.dense.{wb}"] = [f"{q}text_ffn.fc1.{wb}", f"{q}query_ffn.fc1.{wb}"]
            m[f"{b}output.dense.{wb}"] = [f"{q}text_ffn.fc2.{wb}", f"{q}query_ffn.fc2.{wb}"]
            m[f"{b}output.LayerNorm.{wb}"] = [f"{q}text_ffn.norm.{wb}", f"{q}query_ffn.norm.{wb}"]
    return m


@torch.no_grad()
def load_bert_weights(qformer: QFormer, bert_state: dict[str, torch.Tensor]) -> list[str]:
    """Initialise a Q-Former from a HF BertModel state dict (bert-base-uncased, MiniLM, ...).

    - BERT's token-type-0 embedding is folded into the position embeddings (the Q-Former has no token
      types, so this keeps BERT's text embeddings exactly; LAVIS simply drops it).
    - The vocabulary grows by one row for [DEC]; that row stays freshly initialised.
    - Cross-attention and queries stay freshly initialised. Returns the Q-Former keys NOT set from BERT.
    """
    bert_state = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    n_bert = 1 + max(int(k.split(".")[2]) for k in bert_state if k.startswith("encoder.layer."))
    if qformer.cfg.num_layers > n_bert:
        raise ValueError(f"the Q-Former has {qformer.cfg.num_layers} layers but the BERT checkpoint only {n_bert}")
    own = qformer.state_dict()
    loaded = set()
    for bkey, qkeys in bert_to_qformer_keys(qformer.cfg.num_layers).items():
        if bkey not in bert_state:
            raise KeyError(f"BERT checkpoint has no {bkey!r}: is it a BertModel state dict?")
        src = bert_state[bkey]
        if bkey == "embeddings.position_embeddings.weight" and "embeddings.token_type_embeddings.weight" in bert_state:
            src = src + bert_state["embeddings.token_type_embeddings.weight"][0]
        for qkey in qkeys:
            dst = own[qkey]
            if qkey == "word_embeddings.weight":
                dst[: src.shape[0]].copy_(src)  # the extra [DEC] row keeps its fresh init
            elif dst.shape != src.shape:
                raise ValueError(f"{bkey} has shape {tuple(src.shape)} but the Q-Former's {qkey} is {tuple(dst.shape)}:"
                                 " size the QFormerConfig like the BERT checkpoint")
            else:
                dst.copy_(src)
            loaded.add(qkey)
    return sorted(set(own) - loaded)
