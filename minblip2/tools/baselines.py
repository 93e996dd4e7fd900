"""Baselines that tell whether the Q-Former is worth it.

- LinearProbe (retrieval): CLIP-style -- frozen pooled image features and frozen pooled text features,
  two learned linear projections, the same contrastive loss on the same data.
- nearest_neighbour_captions (captioning): copy a caption of the most similar training image.
- LinearProjectionModel (captioning): no Q-Former -- frozen image tokens, pooled to as many tokens as
  there are queries, projected into the frozen LLM by one linear layer or LLaVA-1.5's 2-layer MLP, and trained
  like stage 2 (at a learning rate of its own).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import itc_loss
from ..masks import mean_over_tokens
from ..stage2 import FrozenLLMCaptioner


def pooled_image_features(image_embeds: torch.Tensor) -> torch.Tensor:
    """(N, tokens, D) frozen tokens -> (N, D): the [CLS] token, the ViT's own global summary."""
    return image_embeds[:, 0].float()


@torch.no_grad()
def pooled_text_features(bert, tokenizer, captions: list[str], batch_size: int = 128, max_len: int = 32):
    """Frozen BERT (MiniLM) mean-pooled over real tokens -> (N, H): how sentence-transformers pools it."""
    from ..data import tokenize

    bert.eval()
    out = []
    for i in range(0, len(captions), batch_size):
        tok = tokenize(tokenizer, captions[i:i + batch_size], max_len)
        h = bert(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        out.append(mean_over_tokens(h, tok["attention_mask"]))
    return torch.cat(out)


def frozen_text_encoder(qcfg):
    """The BERT (MiniLM) the Q-Former starts from, as a plain frozen transformers BertModel, and its tokenizer."""
    from transformers import BertConfig, BertModel
    from ..backbones import load_bert
    state, tokenizer = load_bert(qcfg)
    bert = BertModel(BertConfig(hidden_size=qcfg.hidden_size, num_hidden_layers=qcfg.num_layers,
                                num_attention_heads=qcfg.num_heads, intermediate_size=qcfg.intermediate_size),
                     add_pooling_layer=False)
    bert.load_state_dict(state, strict=False)
    return bert.eval().requires_grad_(False), tokenizer


def probe_training_pairs(data, bert, tokenizer, pool=pooled_image_features):
    """(image_x, text_x), one row per training sample of an ImageTextData: sample j is caption j % num_captions
    with its image seen through cached view j // num_captions -- the very pairs the Q-Former trains on.
    pool: (N, tokens, D) -> (N, D'), by default the [CLS] token."""
    image_x = torch.cat([pool(v)[data.row_of_caption] for v in data.all_views])
    text_x = pooled_text_features(bert, tokenizer, data.captions)
    return image_x, text_x.repeat(len(data.all_views), 1)


class LinearProbe(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256, init_temp: float = 0.07):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.temp = nn.Parameter(torch.tensor(init_temp))

    def encode_image(self, x):  # (B, D) -> (B, 1, E): one "query", so ITC's max-over-queries is a no-op
        return F.normalize(self.image_proj(x), dim=-1).unsqueeze(1)

    def encode_text(self, x):
        return F.normalize(self.text_proj(x), dim=-1)

    def forward(self, image_x, text_x, label_smoothing: float = 0.1):
        loss, _, _ = itc_loss(self.encode_image(image_x), self.encode_text(text_x), self.temp, label_smoothing)
        return loss


def train_linear_probe(image_x, text_x, steps: int, batch_size: int, lr: float, seed: int = 0,
                       weight_decay: float = 0.05, warmup: int = 10, label_smoothing: float = 0.1):
    """image_x (Ncap, Di) (each caption's image feature), text_x (Ncap, Dt). Same recipe as stage 1."""
    from ..config import TrainConfig
    from ..tasks import batch_indices
    from ..train import lr_at

    torch.manual_seed(seed)
    probe = LinearProbe(image_x.shape[1], text_x.shape[1])
    t = TrainConfig(lr=lr, min_lr=lr / 10, warmup_steps=warmup, max_steps=steps, batch_size=batch_size)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        idx = batch_indices(step, len(text_x), batch_size, seed)
        loss = probe(image_x[idx], text_x[idx], label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return probe, losses


def _overlap(a: str, b: str) -> float:
    wa, wb = set(a.lower().split()), set(b.lower().split())
    return 2 * len(wa & wb) / max(1, len(wa) + len(wb))


def nearest_neighbour_captions(train_x, train_captions: list[list[str]], test_x) -> list[str]:
    """For each test image, the most similar training image (cosine of pooled frozen features), and of its
    captions the consensus one (highest mean word overlap with its siblings; Devlin et al. 2015)."""
    sim = F.normalize(test_x.float(), dim=-1) @ F.normalize(train_x.float(), dim=-1).t()
    out = []
    for j in sim.argmax(dim=1).tolist():
        caps = train_captions[j]
        out.append(max(caps, key=lambda c: sum(_overlap(c, o) for o in caps if o is not c)))
    return out


class LinearProjectionModel(FrozenLLMCaptioner):
    """Stage 2 without a Q-Former: LayerNorm, the patch grid average-pooled to exactly `num_queries` tokens,
    then a projection into the LLM. Same soft-prompt length, same LLM, same training.

    projector "linear": one linear layer (LLaVA's first projector); "mlp": Linear -> GELU -> Linear, both as wide
    as the LLM (LLaVA-1.5's mlp2x_gelu). Both are fresh: their learning rate is chosen on val (README)."""

    def __init__(self, qcfg, llm, tokenizer, projector: str = "linear", **kw):
        super().__init__(llm, tokenizer, **kw)
        width = llm.get_input_embeddings().embedding_dim
        self.ln_vision = nn.LayerNorm(qcfg.vision_width)
        if projector == "linear":
            self.llm_proj = nn.Linear(qcfg.vision_width, width)
        elif projector == "mlp":
            self.llm_proj = nn.Sequential(nn.Linear(qcfg.vision_width, width), nn.GELU(), nn.Linear(width, width))
        else:
            raise ValueError(f"projector must be 'linear' or 'mlp', not {projector!r}")
        self.num_tokens = qcfg.num_queries

    def visual_prompt(self, image_embeds):
        x = self.ln_vision(image_embeds.to(self.ln_vision.weight.dtype))
        patches = x[:, 1:]  # (B, g*g, D): drop [CLS], keep the patch grid
        g = int(patches.shape[1] ** 0.5)
        # an a x b grid with a * b = num_queries exactly (16 -> 4x4, 32 -> 4x8): the same prompt length
        a = max(d for d in range(1, int(self.num_tokens ** 0.5) + 1) if self.num_tokens % d == 0)
        grid = patches[:, : g * g].transpose(1, 2).reshape(x.shape[0], -1, g, g)
        tokens = F.adaptive_avg_pool2d(grid, (a, self.num_tokens // a)).flatten(2).transpose(1, 2)  # (B, Q, D)
        return self.llm_proj(tokens).to(self.llm.get_input_embeddings().weight.dtype)
