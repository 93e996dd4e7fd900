"""The stage-1 reference the benchmark races minblip2 against: ITC + ITM on transformers' `Blip2QFormerModel`.

It is built the way transformers' `Blip2ForImageTextRetrieval` (and LAVIS) run the Q-Former:

    ITC: a query-only pass (queries cross-attend to the image) and a separate text-only pass
    ITM: one pass over [queries | text] with everything attending to everything, on 3B pairs
         (positives | hard-negative image | hard-negative text)

minblip2 instead runs ITC as ONE pass over [queries | text] under the unimodal mask; the results are the same
(tests/test_qformer.py checks it). The losses, the hard-negative sampling, the projections and heads are
minblip2's own functions and shapes, and the weights are copied from a minblip2 `Stage1Model`, so the two
models do the same work on the same numbers: only the Q-Former implementation differs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from minblip2 import losses
from minblip2.config import QFormerConfig, Stage1Config
from minblip2.tools.convert import hf_qformer_key_map
from minblip2.masks import mean_over_tokens


def hf_config(q: QFormerConfig) -> Blip2QFormerConfig:
    """minblip2's QFormerConfig spelled as transformers' Blip2QFormerConfig (same sizes, same dropout)."""
    return Blip2QFormerConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=q.dropout, attention_probs_dropout_prob=q.dropout,
        max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
        pad_token_id=q.pad_token_id, cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=q.vision_width, use_qformer_text_input=True)  # text FFNs: stage 1 needs them


class HFStage1Reference(nn.Module):
    """ITC + ITM with transformers' Q-Former; same parameters as a minblip2 Stage1Model (minus the ITG head)."""

    def __init__(self, qcfg: QFormerConfig, scfg: Stage1Config):
        super().__init__()
        self.qcfg, self.scfg = qcfg, scfg
        cfg = hf_config(qcfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, qcfg.num_queries, qcfg.hidden_size))
        self.embeddings = Blip2TextEmbeddings(cfg)  # word + position embeddings (HF keeps them outside the Q-Former)
        self.qformer = Blip2QFormerModel(cfg)  # its default attention: "sdpa", as for minblip2
        self.ln_vision = nn.LayerNorm(qcfg.vision_width)
        self.vision_proj = nn.Linear(qcfg.hidden_size, qcfg.embed_dim)
        self.text_proj = nn.Linear(qcfg.hidden_size, qcfg.embed_dim)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(scfg.init_temp))

    @classmethod
    @torch.no_grad()
    def from_minblip2(cls, model) -> "HFStage1Reference":
        """A reference holding exactly `model`'s weights (a minblip2 Stage1Model), through convert.py's key map."""
        ref = cls(model.qcfg, model.scfg)
        q = model.qcfg
        ours = model.state_dict()
        state = {hf: ours[f"qformer.{k}"] for k, hf in hf_qformer_key_map(q.num_layers, q.cross_attention_freq).items()}
        state["query_tokens"] = ours["qformer.query_tokens"]
        state["embeddings.word_embeddings.weight"] = ours["qformer.word_embeddings.weight"]
        state["embeddings.position_embeddings.weight"] = ours["qformer.position_embeddings.weight"]
        for name in ("ln_vision", "vision_proj", "text_proj", "itm_head"):
            for wb in ("weight", "bias"):
                state[f"{name}.{wb}"] = ours[f"{name}.{wb}"]
        state["temp"] = ours["temp"]
        ref.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)  # strict: every weight is set
        return ref

    def forward(self, image_embeds, input_ids, text_mask, image_ids=None, generator=None):
        """Same inputs and outputs as minblip2's Stage1Model.forward with losses=("itc", "itm")."""
        B, Q = image_embeds.shape[0], self.qcfg.num_queries
        img = self.ln_vision(image_embeds)
        img_att = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)  # HF passes it; all ones

        # ITC: queries alone, then text alone (two passes, as Blip2ForImageTextRetrieval does)
        q = self.qformer(query_embeds=self.query_tokens.expand(B, -1, -1), encoder_hidden_states=img,
                         encoder_attention_mask=img_att).last_hidden_state
        t = self.qformer(query_embeds=self.embeddings(input_ids=input_ids), query_length=0,
                         attention_mask=text_mask).last_hidden_state
        image_feats = F.normalize(self.vision_proj(q), dim=-1)  # (B, Q, E)
        # BLIP-2's [CLS], or (cpu preset) the mean over tokens, as MiniLM was trained: the same work as minblip2
        pooled = mean_over_tokens(t, text_mask) if self.qcfg.text_pooling == "mean" else t[:, 0]
        text_feats = F.normalize(self.text_proj(pooled), dim=-1)  # (B, E)
        loss_itc, sim_i2t, sim_t2i = losses.itc_loss(image_feats, text_feats, self.temp,
                                                      self.scfg.label_smoothing, self.scfg.itc_gather_grad)

        # ITM: 3B pairs through one bidirectional pass over [queries | text]
        neg_text, neg_image = losses.sample_hard_negatives(sim_i2t, sim_t2i, image_ids, image_ids, generator)
        itm_ids = torch.cat([input_ids, input_ids, input_ids[neg_text]], dim=0)
        itm_mask = torch.cat([text_mask, text_mask, text_mask[neg_text]], dim=0)
        itm_img = torch.cat([img, img[neg_image], img], dim=0)
        emb = self.embeddings(input_ids=itm_ids, query_embeds=self.query_tokens.expand(3 * B, -1, -1))
        att = torch.cat([torch.ones(3 * B, Q, dtype=itm_mask.dtype, device=itm_mask.device), itm_mask], dim=1)
        h = self.qformer(query_embeds=emb, query_length=Q, attention_mask=att, encoder_hidden_states=itm_img,
                         encoder_attention_mask=torch.cat([img_att] * 3)).last_hidden_state
        loss_itm = losses.itm_loss(self.itm_head(h[:, :Q]).mean(dim=1), num_pos=B)

        loss = loss_itc + loss_itm
        return {"loss": loss, "loss_itc": loss_itc.detach(), "loss_itm": loss_itm.detach()}
