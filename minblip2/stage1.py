"""Stage 1: the Q-Former learns to pull language-relevant features out of a FROZEN image encoder.

    frozen image tokens (B, N, Dv) -> ln_vision -> Q-Former queries -> vision_proj -> (B, Q, E)  -\
    caption tokens (B, T)         ->             Q-Former text    -> text_proj   -> (B, E)     --> ITC
    queries + caption, bidirectional mask -> itm_head on each query, averaged  -> (3B, 2)           ITM
    [DEC] + caption, multimodal causal mask -> lm_head                         -> (B, T, vocab)     ITG

The model takes image TOKENS, not pixels: the frozen encoder runs outside it (see train.py), so its
features can be computed once and cached.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist, losses, masks
from .config import QFormerConfig, Stage1Config
from .qformer import QFormer, init_bert_weights


class LMHead(nn.Module):
    """BERT's masked-LM head reused for generation: dense -> GELU -> LayerNorm -> tied decoder + bias."""

    def __init__(self, cfg: QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.word_embeddings = word_embeddings  # tied: the decoder weight IS the input embedding

    def forward(self, h):
        return F.linear(self.norm(F.gelu(self.dense(h))), self.word_embeddings.weight, self.bias)

    @torch.no_grad()
    def load_bert(self, bert_state: dict[str, torch.Tensor]) -> bool:
        """Start from BERT's masked-LM head (`cls.predictions.*`) if the checkpoint has one (as LAVIS does); the
        decoder needs nothing, it is the word embeddings. Returns whether it was there."""
        p = "cls.predictions."
        if p + "bias" not in bert_state:
            return False
        for ours, theirs in ((self.dense, "transform.dense"), (self.norm, "transform.LayerNorm")):
            ours.weight.copy_(bert_state[f"{p}{theirs}.weight"])
            ours.bias.copy_(bert_state[f"{p}{theirs}.bias"])
        bias = bert_state[p + "bias"]
        self.bias[: len(bias)].copy_(bias)  # the [DEC] row keeps its 0: [DEC] is never predicted
        return True


class Stage1Model(nn.Module):
    def __init__(self, qcfg: QFormerConfig, scfg: Stage1Config | None = None):
        super().__init__()
        scfg = scfg or Stage1Config()
        self.qcfg, self.scfg = qcfg, scfg
        self.ln_vision = nn.LayerNorm(qcfg.vision_width)  # trained; normalises the frozen encoder's tokens
        self.qformer = QFormer(qcfg)
        self.vision_proj = nn.Linear(qcfg.hidden_size, qcfg.embed_dim)
        self.text_proj = nn.Linear(qcfg.hidden_size, qcfg.embed_dim)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        self.lm_head = LMHead(qcfg, self.qformer.word_embeddings)
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.lm_head.dense, self.lm_head.norm):
            init_bert_weights(m)
        self.temp = nn.Parameter(torch.tensor(scfg.init_temp))

    # ------------------------------------------------------------------ the pieces retrieval also uses

    def encode_image(self, image_embeds):
        """Frozen image tokens (B, N, Dv) -> (normalised ITC features (B, Q, E), query outputs (B, Q, H))."""
        q = self.qformer(self.ln_vision(image_embeds))
        return F.normalize(self.vision_proj(q), dim=-1), q

    def encode_text(self, input_ids, text_mask):
        """Caption tokens (B, T) -> normalised ITC text feature (B, E), pooled by pool_text. Text alone = unimodal."""
        h = self.qformer(input_ids=input_ids, text_mask=text_mask)
        return F.normalize(self.text_proj(self.pool_text(h, text_mask)), dim=-1)

    def pool_text(self, h_text, text_mask):
        """(B, T, H) text outputs -> (B, H): [CLS] (BLIP-2), or the mean over real tokens (text_pooling="mean")."""
        if self.qcfg.text_pooling == "cls":
            return h_text[:, 0]
        if self.qcfg.text_pooling == "mean":
            return masks.mean_over_tokens(h_text, text_mask)
        raise ValueError(f"qformer.text_pooling must be 'cls' or 'mean', not {self.qcfg.text_pooling!r}")

    def itm_logits(self, image_embeds, input_ids, text_mask, image_kv=None):
        """Queries + text under the bidirectional mask -> (B, 2) match/no-match logits, averaged over queries.
        image_kv: the images' cross-attention keys/values already computed (then image_embeds is not used)."""
        if image_kv is None:
            image_kv = self.qformer.image_kv(self.ln_vision(image_embeds))
        Q, T = self.qcfg.num_queries, input_ids.shape[1]
        h = self.qformer(input_ids=input_ids, text_mask=text_mask, image_kv=image_kv,
                         mask=masks.bidirectional_mask(Q, T, device=input_ids.device))
        return self.itm_head(h[:, :Q]).mean(dim=1)

    # ------------------------------------------------------------------ training

    def forward(self, image_embeds, input_ids, text_mask, image_ids=None, generator=None):
        """image_embeds (B, N, Dv) frozen tokens, input_ids/text_mask (B, T) starting with [CLS].

        Returns a dict with `loss` (the sum of the enabled losses) and each loss detached for logging.
        `Stage1Config.fast_passes` (default) computes the very same losses with less work (`fast_losses`).
        """
        if self.scfg.fast_passes:
            return self.fast_losses(image_embeds, input_ids, text_mask, image_ids, generator)
        return self.plain_losses(image_embeds, input_ids, text_mask, image_ids, generator)

    def plain_losses(self, image_embeds, input_ids, text_mask, image_ids=None, generator=None):
        """The paper's recipe, one Q-Former pass per objective: read this one first."""
        use = set(self.scfg.losses)
        Q, T = self.qcfg.num_queries, input_ids.shape[1]
        img = self.ln_vision(image_embeds)  # (B, N, Dv)
        ids_all = dist.all_gather_no_grad(image_ids) if image_ids is not None else None  # the global batch's
        out, total = {}, 0.0

        # ITC, unimodal: the queries read the image (and never the text), the text reads only itself
        queries = self.qformer(img)  # (B, Q, H)
        image_feats = F.normalize(self.vision_proj(queries), dim=-1)  # (B, Q, E)
        h_text = self.qformer(input_ids=input_ids, text_mask=text_mask)  # (B, T, H)
        text_feats = F.normalize(self.text_proj(self.pool_text(h_text, text_mask)), dim=-1)  # (B, E)
        loss_itc, sim_i2t, sim_t2i = self._itc(image_feats, text_feats, image_ids, ids_all)
        if "itc" in use:
            total = total + loss_itc
        out["loss_itc"] = loss_itc.detach()
        if self.scfg.query_sim_weight:  # not the paper's: pushes the queries apart (losses.query_similarity)
            clean = self._queries_without_dropout(img)
            loss_qsim = losses.query_similarity(clean)
            total = total + self.scfg.query_sim_weight * loss_qsim
            out["loss_qsim"] = loss_qsim.detach()
            out["query_erank"] = losses.query_effective_rank(clean)

        if "itm" in use:  # bidirectional: queries and text see each other; 3B rows, one third positives
            neg_text, neg_image, neg_image_all = self._hard_negatives(sim_i2t, sim_t2i, image_ids, ids_all, generator)
            neg_img = self._negative_images(image_embeds, neg_image, neg_image_all)  # maybe another process's
            ids, tmask, ids_all_t, tmask_all = _gather_padded(input_ids, text_mask, self.qcfg.pad_token_id)
            itm_img = torch.cat([img, neg_img, img])  # positives | (negative image, text) | (image, negative text)
            itm_ids = torch.cat([ids, ids, ids_all_t[neg_text]])
            itm_mask = torch.cat([tmask, tmask, tmask_all[neg_text]])
            h = self.qformer(itm_img, input_ids=itm_ids, text_mask=itm_mask,
                             mask=masks.bidirectional_mask(Q, ids.shape[1], device=img.device))
            loss_itm = losses.itm_loss(self.itm_head(h[:, :Q]).mean(dim=1), num_pos=input_ids.shape[0])
            total = total + loss_itm
            out["loss_itm"] = loss_itm.detach()

        if "itg" in use:  # multimodal causal: each text token sees every query and the text before it
            dec_ids = self._dec(input_ids)
            h = self.qformer(img, input_ids=dec_ids, text_mask=text_mask,
                             mask=masks.multimodal_causal_mask(Q, T, device=img.device))
            loss_itg = losses.itg_loss(self.lm_head(h[:, Q:]), dec_ids, text_mask, self.scfg.label_smoothing)
            total = total + loss_itg
            out["loss_itg"] = loss_itg.detach()

        out["temp"] = self.temp.detach().clone()  # logged: it trains (at the fresh weights' lr) and sets ITC's sharpness;
        # a copy: detach() alone shares the parameter's storage, and the optimizer step would change the logged value
        out["loss"] = total
        return out

    def _itc(self, image_feats, text_feats, image_ids, ids_all):
        if self.scfg.clamp_temp:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        return losses.itc_loss(image_feats, text_feats, self.temp, self.scfg.label_smoothing,
                               self.scfg.itc_gather_grad, image_ids, ids_all)

    def _hard_negatives(self, sim_i2t, sim_t2i, image_ids, ids_all, generator):
        """ITM's negative text and image for each of this process's pairs, as indices into the global batch, and the
        negative images of EVERY process's pairs, (W, B), for _negative_images."""
        neg_text, neg_image = losses.sample_hard_negatives(sim_i2t, sim_t2i, image_ids, ids_all, generator,
                                                           every_process=True)
        B, r = sim_i2t.shape[0], dist.rank()
        return neg_text[r * B:(r + 1) * B], neg_image[r * B:(r + 1) * B], neg_image.view(dist.world_size(), B)

    def _negative_images(self, image_embeds, neg_image, neg_image_all):
        """ln_vision(the frozen image tokens of this process's negative images), wherever they live.

        Only the B rows this process needs travel (dist.rows_wanted: one all_to_all), in the autocast dtype, and
        no gradient goes back: the tokens are frozen, and ln_vision runs here on what arrived, so its gradient
        from the negatives lands in this process and DDP averages it as any other. (Before: every process
        all-gathered every process's ln_vision output in fp32 WITH gradient -- W*B rows each way, ~1.2 GB per
        process at the paper's 8 x 105 x 257 x 1408 -- to use B of them.)"""
        device = image_embeds.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else image_embeds.dtype
        if dist.world_size() == 1:
            return self.ln_vision(image_embeds[neg_image])
        tokens = dist.rows_wanted(image_embeds.detach().to(dtype), neg_image_all)
        return self.ln_vision(tokens.to(image_embeds.dtype))

    def _queries_without_dropout(self, img=None, image_kv=None):
        """The query outputs (B, Q, H) of one more pass with dropout off, as stage 2 and retrieval will see them.

        query_similarity needs this pass: measured on the training pass, the Q-Former met it with dropout noise
        alone (loss 0.16 in training, while the queries of the trained model in eval mode had cosine 0.997).
        Gradients flow; only dropout is off (the Q-Former has no other train/eval difference; gradient
        checkpointing stays on, see QFormer.forward)."""
        was_training = self.qformer.training
        self.qformer.train(False)
        try:
            return self.qformer(img, image_kv=image_kv)
        finally:
            self.qformer.train(was_training)

    def _dec(self, input_ids):
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.qcfg.dec_token_id  # [DEC] instead of [CLS] tells the Q-Former to generate
        return dec_ids

    # ------------------------------------------------------------------ the same losses, less work

    def fast_losses(self, image_embeds, input_ids, text_mask, image_ids=None, generator=None):
        """`plain_losses`, with the work the three passes share done once (tests/test_qformer.py proves the losses
        and gradients equal):
        - the images' cross-attention keys/values (projecting 257 image tokens is most of a query pass) are
          computed once and read by ITC and ITM (and by ITM's negatives: rows of the same tensors);
        - ITC's two unimodal passes run as ONE pass over [queries | text] under the unimodal mask;
        - ITG reuses the queries' keys/values of that pass: under ITG's mask the queries never see the text, so
          their states are those of the ITC pass (LAVIS does this with past_key_values).
        """
        use = set(self.scfg.losses)
        Q, T = self.qcfg.num_queries, input_ids.shape[1]
        img = self.ln_vision(image_embeds)
        image_kv = self.qformer.image_kv(img)  # every cross-attention layer's (keys, values) of the images
        ids_all = dist.all_gather_no_grad(image_ids) if image_ids is not None else None
        out, total = {}, 0.0

        h, cache = self.qformer(input_ids=input_ids, text_mask=text_mask, image_kv=image_kv, return_cache=True,
                                mask=masks.unimodal_mask(Q, T, device=img.device))
        image_feats = F.normalize(self.vision_proj(h[:, :Q]), dim=-1)  # (B, Q, E)
        text_feats = F.normalize(self.text_proj(self.pool_text(h[:, Q:], text_mask)), dim=-1)  # (B, E)
        loss_itc, sim_i2t, sim_t2i = self._itc(image_feats, text_feats, image_ids, ids_all)
        if "itc" in use:
            total = total + loss_itc
        out["loss_itc"] = loss_itc.detach()
        if self.scfg.query_sim_weight:  # not the paper's: pushes the queries apart (losses.query_similarity)
            clean = self._queries_without_dropout(image_kv=image_kv)
            loss_qsim = losses.query_similarity(clean)
            total = total + self.scfg.query_sim_weight * loss_qsim
            out["loss_qsim"] = loss_qsim.detach()
            out["query_erank"] = losses.query_effective_rank(clean)  # the honest diagnostic beside it

        if "itm" in use:
            neg_text, neg_image, neg_image_all = self._hard_negatives(sim_i2t, sim_t2i, image_ids, ids_all, generator)
            if dist.world_size() == 1:  # every negative image is in this batch: its keys/values exist already
                neg_kv = [None if kv is None else (kv[0][neg_image], kv[1][neg_image]) for kv in image_kv]
            else:  # a negative may be another process's image
                neg_kv = self.qformer.image_kv(self._negative_images(image_embeds, neg_image, neg_image_all))
            ids, tmask, ids_all_t, tmask_all = _gather_padded(input_ids, text_mask, self.qcfg.pad_token_id)
            itm_ids = torch.cat([ids, ids, ids_all_t[neg_text]], dim=0)
            itm_mask = torch.cat([tmask, tmask, tmask_all[neg_text]], dim=0)
            itm_kv = [None if kv is None else tuple(torch.cat([x, x_neg, x]) for x, x_neg in zip(kv, nkv))
                      for kv, nkv in zip(image_kv, neg_kv)]
            logits = self.itm_logits(None, itm_ids, itm_mask, image_kv=itm_kv)
            loss_itm = losses.itm_loss(logits, num_pos=input_ids.shape[0])
            total = total + loss_itm
            out["loss_itm"] = loss_itm.detach()

        if "itg" in use:
            dec_ids = self._dec(input_ids)
            query_cache = [(k[:, :, :Q], v[:, :, :Q]) for k, v in cache]
            # the multimodal causal mask is then a plain causal one over [cached queries | text]: no mask tensor
            # (FlashAttention on GPUs); right padding needs none (see QFormer.forward)
            h_text = self.qformer(input_ids=dec_ids, text_mask=text_mask, causal=True, query_cache=query_cache)
            loss_itg = losses.itg_loss(self.lm_head(h_text), dec_ids, text_mask, self.scfg.label_smoothing)
            total = total + loss_itg
            out["loss_itg"] = loss_itg.detach()

        out["temp"] = self.temp.detach().clone()  # the value this step used (see forward)
        out["loss"] = total
        return out


def _gather_padded(input_ids, text_mask, pad_id):
    """Gather token ids from every process, padded to the world's longest length (local ones padded too)."""
    if dist.world_size() == 1:
        return input_ids, text_mask, input_ids, text_mask
    T = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    torch.distributed.all_reduce(T, op=torch.distributed.ReduceOp.MAX)
    pad = int(T.item()) - input_ids.shape[1]
    input_ids = F.pad(input_ids, (0, pad), value=pad_id)
    text_mask = F.pad(text_mask, (0, pad), value=0)
    return input_ids, text_mask, dist.all_gather_no_grad(input_ids), dist.all_gather_no_grad(text_mask)
