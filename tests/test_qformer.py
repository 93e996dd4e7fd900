"""The Q-Former and stage-1 model: parity with transformers' BLIP-2, masks, and parameter counts."""
import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2Config, Blip2QFormerConfig, Blip2QFormerModel, Blip2ForImageTextRetrieval

from minblip2 import losses, masks
from minblip2.config import QFormerConfig, Stage1Config, paper
from minblip2.tools.convert import load_hf_qformer, load_hf_retrieval
from minblip2.tools.diagnostics import saved_for_backward_bytes
from minblip2.qformer import QFormer
from minblip2.stage1 import Stage1Model

TINY = dict(hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, num_queries=6,
            cross_attention_freq=2, vision_width=24, embed_dim=16, vocab_size=100, max_position_embeddings=40,
            dec_token_id=99)


def tiny_hf_qformer_config(text_ffn=True):
    return Blip2QFormerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                              intermediate_size=64, cross_attention_frequency=2, encoder_hidden_size=24,
                              max_position_embeddings=40, use_qformer_text_input=text_ffn)


def test_qformer_matches_transformers_blip2_qformer():
    torch.manual_seed(0)
    hf = Blip2QFormerModel(tiny_hf_qformer_config(text_ffn=False)).eval()
    ours = QFormer(QFormerConfig(**TINY)).eval()
    state = {f"qformer.{k}": v for k, v in hf.state_dict().items()}
    state["query_tokens"] = torch.randn(1, 6, 32)
    missing = load_hf_qformer(ours, state, embeddings_prefix=None, text_ffn=False)
    assert all(k.startswith(("word_", "position_")) or ".text_ffn." in k for k in missing), missing
    image = torch.randn(3, 11, 24)
    ref = hf(query_embeds=state["query_tokens"].expand(3, -1, -1), encoder_hidden_states=image).last_hidden_state
    got = ours(image)
    assert got.shape == (3, 6, 32)
    assert (got - ref).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def retrieval_pair():
    torch.manual_seed(0)
    from transformers import Blip2VisionConfig
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8).to_dict(),
        qformer_config=tiny_hf_qformer_config(text_ffn=True).to_dict(), num_query_tokens=6,
        image_text_hidden_size=16)
    hf = Blip2ForImageTextRetrieval(cfg).eval()
    with torch.no_grad():  # HF inits query tokens to zeros and some norms to identity: make them non-trivial
        for n, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = Stage1Model(QFormerConfig(**TINY), Stage1Config()).eval()
    load_hf_retrieval(ours, hf.state_dict())
    return hf, ours


def _inputs():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    ids = torch.randint(5, 99, (4, 7), generator=g)
    ids[:, 0] = 1
    att = torch.ones(4, 7, dtype=torch.long)
    att[1, 5:] = 0
    att[3, 3:] = 0
    ids[att == 0] = 0
    return pixels, ids, att


def _raw_image_tokens(hf, pixels):
    """The vision tower's tokens BEFORE post_layernorm (minblip2 applies that norm as ln_vision)."""
    out = hf.vision_model(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-1]


def test_itm_logits_match_transformers(retrieval_pair):
    hf, ours = retrieval_pair
    pixels, ids, att = _inputs()
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=att, use_image_text_matching_head=True)
        got = ours.itm_logits(_raw_image_tokens(hf, pixels), ids, att)
    assert got.shape == (4, 2)
    assert (got - ref.logits_per_image).abs().max() <= 1e-5


def test_itc_scores_match_transformers(retrieval_pair):
    hf, ours = retrieval_pair
    pixels, ids, att = _inputs()
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=att, use_image_text_matching_head=False)
        img_feats, _ = ours.encode_image(_raw_image_tokens(hf, pixels))
        txt_feats = ours.encode_text(ids, att)
    from minblip2.losses import itc_similarities
    got = itc_similarities(img_feats, txt_feats)  # (images, texts)
    assert (img_feats - ref.image_embeds).abs().max() <= 1e-5
    assert (txt_feats - ref.text_embeds).abs().max() <= 1e-5
    assert (got - ref.logits_per_image).abs().max() <= 1e-5


def _tiny_model_and_batch(n: int, pad_from: int | None = None, **qformer):
    """A tiny eval-mode Stage1Model (TINY, with the `qformer` changes) and n images (9 tokens x 24) with n 8-token
    captions; row 0 padded from pad_from."""
    torch.manual_seed(0)
    m = Stage1Model(QFormerConfig(**{**TINY, **qformer})).eval()
    img = torch.randn(n, 9, 24)
    ids = torch.randint(5, 99, (n, 8))
    att = torch.ones(n, 8, dtype=torch.long)
    if pad_from is not None:
        att[-1, pad_from:] = 0
    return m, img, ids, att


def test_joint_unimodal_pass_equals_separate_passes():
    m, img, ids, att = _tiny_model_and_batch(3, pad_from=6)
    with torch.no_grad():
        joint = m.qformer(m.ln_vision(img), ids, att, mask=masks.unimodal_mask(6, 8))
        q_alone = m.qformer(m.ln_vision(img))
        t_alone = m.qformer(input_ids=ids, text_mask=att)
    assert torch.allclose(joint[:, :6], q_alone, atol=1e-5)
    assert torch.allclose(joint[:, 6:][att.bool()], t_alone[att.bool()], atol=1e-5)


def _itg_logits(m, img, ids, att, reuse):
    Q, T = m.qcfg.num_queries, ids.shape[1]
    x = m.ln_vision(img)
    causal = masks.multimodal_causal_mask(Q, T)
    if reuse:
        _, cache = m.qformer(x, return_cache=True)
        h = m.qformer(input_ids=ids, text_mask=att, mask=causal, query_cache=cache)
    else:
        h = m.qformer(x, ids, att, mask=causal)[:, Q:]
    return m.lm_head(h)


@pytest.mark.parametrize("reuse", [True, False])
def test_itg_is_causal(reuse):
    m, img, ids, att = _tiny_model_and_batch(2)
    ids2 = ids.clone()
    ids2[:, 5] = (ids[:, 5] + 7) % 90 + 5  # change a later token
    with torch.no_grad():
        a, b = _itg_logits(m, img, ids, att, reuse), _itg_logits(m, img, ids2, att, reuse)
    assert torch.equal(a[:, :5], b[:, :5]) or (a[:, :5] - b[:, :5]).abs().max() < 1e-6
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4  # ...and the change is visible from there on


def test_itg_query_cache_equals_full_recompute():
    m, img, ids, att = _tiny_model_and_batch(2, pad_from=6)
    with torch.no_grad():
        a, b = _itg_logits(m, img, ids, att, True), _itg_logits(m, img, ids, att, False)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_itg_needs_no_mask_tensor(impl, monkeypatch):
    """ITG after cached queries is a plain (lower-right) causal attention: with right-padded text the pass gives
    SDPA no mask tensor -- so a GPU may run FlashAttention, which takes no boolean mask -- and the real tokens'
    outputs, hence the ITG loss, are those of the explicit mask with padding. (Pads' own rows change: unused.)"""
    m, img, ids, att = _tiny_model_and_batch(3, pad_from=5)
    for layer in m.qformer.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            if attn is not None:
                attn.impl = impl
    Q, T = 6, 8
    with torch.no_grad():
        _, cache = m.qformer(m.ln_vision(img), return_cache=True)
        masked = m.qformer(input_ids=ids, text_mask=att, mask=masks.multimodal_causal_mask(Q, T), query_cache=cache)
        causal = m.qformer(input_ids=ids, text_mask=att, causal=True, query_cache=cache)
    real = att.bool()
    assert torch.allclose(masked[real], causal[real], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="query_cache"):
        m.qformer(input_ids=ids, text_mask=att, causal=True)

    # the training forward: its ITG pass hands SDPA no tensor mask (only ITC/ITM, which need one, do)
    seen = []
    F = torch.nn.functional

    class SpyF:  # qformer's `F`, recording each SDPA mask (patching F itself would hide SDPA from CausalBias)
        def __getattr__(self, name):
            return getattr(F, name)

        def scaled_dot_product_attention(self, q, k, v, attn_mask=None, **kw):
            seen.append(None if attn_mask is None else type(attn_mask).__name__)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr("minblip2.qformer.F", SpyF())
    m.scfg.losses = ("itg",)
    with torch.no_grad():
        loss = m(img, ids, att)["loss_itg"]
    if impl == "sdpa":  # ITC pass (needed for the cache): 4 masked self-attentions; ITG: 4 causal, no tensor
        assert seen.count("CausalBias") == 4 and seen.count("Tensor") == 4 and "CausalBias" not in seen[:6]
    with torch.no_grad():  # the loss with the explicit mask, computed by hand as before
        dec = ids.clone()
        dec[:, 0] = m.qcfg.dec_token_id
        h = m.qformer(input_ids=dec, text_mask=att, mask=masks.multimodal_causal_mask(Q, T), query_cache=cache)
        from minblip2.losses import itg_loss
        ref = itg_loss(m.lm_head(h), dec, att, m.scfg.label_smoothing)
    assert torch.allclose(loss, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mask_fn", [masks.unimodal_mask, masks.multimodal_causal_mask])
def test_queries_never_attend_to_text(mask_fn):
    torch.manual_seed(0)
    m = Stage1Model(QFormerConfig(**TINY)).eval()
    img = torch.randn(2, 9, 24)
    ids = torch.randint(5, 99, (2, 8))
    with torch.no_grad():
        a = m.qformer(img, ids, None, mask=mask_fn(6, 8))[:, :6]
        b = m.qformer(img, torch.randint(5, 99, (2, 8)), None, mask=mask_fn(6, 8))[:, :6]
        c = m.qformer(img, ids, None, mask=masks.bidirectional_mask(6, 8))[:, :6]
        d = m.qformer(img, torch.randint(5, 99, (2, 8)), None, mask=masks.bidirectional_mask(6, 8))[:, :6]
    assert (a - b).abs().max() < 1e-6  # the queries cannot see the text...
    assert (c - d).abs().max() > 1e-4  # ...which they do under ITM's bidirectional mask


def test_mask_shapes_and_counts():
    Q, T = 4, 3
    u, b, c = masks.unimodal_mask(Q, T), masks.bidirectional_mask(Q, T), masks.multimodal_causal_mask(Q, T)
    assert u.shape == b.shape == c.shape == (7, 7)
    assert u.sum() == Q * Q + T * T and b.sum() == 49 and c.sum() == Q * Q + T * Q + T * (T + 1) // 2


def test_paper_scale_stage1_has_188M_trainable_params():
    cfg = paper()
    with torch.device("meta"):  # shapes only: no memory is allocated
        m = Stage1Model(cfg.qformer, cfg.stage1)
    n = sum(p.numel() for p in m.parameters())  # tied LM decoder counted once by .parameters()
    assert 185e6 < n < 191e6, n


def test_batch_size_one_forward_without_itm():
    torch.manual_seed(0)
    m = Stage1Model(QFormerConfig(**TINY), Stage1Config(losses=("itc", "itg")))
    out = m(torch.randn(1, 9, 24), torch.randint(5, 99, (1, 8)), torch.ones(1, 8, dtype=torch.long))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_itm_with_batch_size_one_explains_itself():
    m = Stage1Model(QFormerConfig(**TINY))
    with pytest.raises(ValueError, match="ITM needs a negative"):
        m(torch.randn(1, 9, 24), torch.randint(5, 99, (1, 8)), torch.ones(1, 8, dtype=torch.long))


def test_math_attention_equals_sdpa():
    """attn_impl="math" writes SDPA's computation out (faster CPU training, see bench/): same outputs, same grads."""
    m, img, ids, att = _tiny_model_and_batch(3, pad_from=5)
    m2 = Stage1Model(QFormerConfig(**{**TINY, "attn_impl": "math"})).eval()
    m2.load_state_dict(m.state_dict())
    mask = masks.bidirectional_mask(6, 8)
    outs = []
    for model in (m, m2):
        h = model.qformer(model.ln_vision(img), ids, att, mask=mask)
        h[:, :, 0].sum().backward()
        outs.append((h.detach(), model.qformer.query_tokens.grad.clone()))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5) and torch.allclose(outs[0][1], outs[1][1], atol=1e-5)
    with pytest.raises(ValueError, match="attn_impl"):
        QFormer(QFormerConfig(**{**TINY, "attn_impl": "flash"}))


def test_itm_loss_equals_the_loss_from_raw_image_tokens():
    """forward() reuses the ITC pass's image keys/values for ITM (the negatives' by indexing): the ITM loss must be
    what the plain recipe gives -- sample negatives, re-run the images [positive | negative | positive] from scratch."""

    m, img, ids, att = _tiny_model_and_batch(4, pad_from=5)
    image_ids = torch.arange(4)
    out = m(img, ids, att, image_ids=image_ids, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image_feats, _ = m.encode_image(img)
        _, sim_i2t, sim_t2i = losses.itc_loss(image_feats, m.encode_text(ids, att), m.temp)
        neg_text, neg_image = losses.sample_hard_negatives(sim_i2t, sim_t2i, image_ids, image_ids,
                                                           torch.Generator().manual_seed(3))
        logits = m.itm_logits(torch.cat([img, img[neg_image], img]), torch.cat([ids, ids, ids[neg_text]]),
                              torch.cat([att, att, att[neg_text]]))
    assert (neg_image != torch.arange(4)).all()
    assert torch.allclose(out["loss_itm"], losses.itm_loss(logits, num_pos=4), atol=1e-6)


@pytest.mark.parametrize("use,query_sim", [(("itc", "itm", "itg"), 0.0), (("itc", "itg"), 0.0), (("itm",), 0.0),
                                           (("itc", "itm", "itg"), 0.5)])
def test_fast_losses_equal_the_plain_three_passes(use, query_sim):
    """Stage1Model.fast_losses (ITC in one pass, shared image keys/values, ITG on cached queries) is only an
    optimisation of plain_losses (one Q-Former pass per objective, as the paper describes): same losses, same
    gradients for every parameter. Dropout off (eval mode): the two spend the random stream differently."""
    m, img, ids, att = _tiny_model_and_batch(4, pad_from=5)
    m.scfg.losses, m.scfg.query_sim_weight = use, query_sim
    image_ids = torch.tensor([0, 1, 1, 2])  # two captions of one image: ITC's soft targets, ITM's negatives
    results = []
    for fast in (True, False):
        m.zero_grad()
        out = (m.fast_losses if fast else m.plain_losses)(img, ids, att, image_ids, torch.Generator().manual_seed(5))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (fast, g_fast), (plain, g_plain) = results
    assert ("loss_qsim" in fast) == (query_sim > 0)
    for k in fast:
        assert torch.allclose(fast[k], plain[k], atol=1e-6), k
    assert g_fast.keys() == g_plain.keys() and len(g_fast) > 10
    for n in g_fast:
        assert torch.allclose(g_fast[n], g_plain[n], atol=1e-5, rtol=1e-4), n
    m.scfg.fast_passes = False  # forward() dispatches on the config
    assert torch.equal(m(img, ids, att, image_ids, torch.Generator().manual_seed(5))["loss"], plain["loss"])


def test_itc_targets_spread_over_every_caption_of_the_same_image():
    """Rows 0 and 1 are two captions of one image: each is a positive for the other's image, so ITC's target
    is 1/2 on both (LAVIS, with image ids), smoothed like cross_entropy's label_smoothing; never one-hot."""

    g = torch.Generator().manual_seed(0)
    image_feats = torch.nn.functional.normalize(torch.randn(3, 4, 8, generator=g), dim=-1)
    text_feats = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    temp, ls = torch.tensor(0.07), 0.1
    loss, sim_i2t, sim_t2i = losses.itc_loss(image_feats, text_feats, temp, ls, image_ids=torch.tensor([7, 7, 9]))
    same = torch.tensor([[1., 1, 0], [1, 1, 0], [0, 0, 1]])
    target = (1 - ls) * same / same.sum(1, keepdim=True) + ls / 3  # LAVIS's sim_targets
    by_hand = sum(-(sim.log_softmax(1) * target).sum(1).mean() for sim in (sim_i2t, sim_t2i)) / 2
    assert torch.allclose(loss, by_hand, atol=1e-6)
    one_hot, _, _ = losses.itc_loss(image_feats, text_feats, temp, ls)  # no ids: the diagonal only
    assert not torch.allclose(loss, one_hot)
    distinct, _, _ = losses.itc_loss(image_feats, text_feats, temp, ls, image_ids=torch.tensor([7, 8, 9]))
    assert torch.allclose(distinct, one_hot, atol=1e-6)

    m, img, ids, att = _tiny_model_and_batch(3)  # the model passes its image ids to ITC
    m.scfg.losses = ("itc",)
    with torch.no_grad():
        twice = m(img, ids, att, image_ids=torch.tensor([7, 7, 9]))["loss_itc"]
        diag = m(img, ids, att, image_ids=torch.tensor([7, 8, 9]))["loss_itc"]
    assert not torch.allclose(twice, diag) and torch.allclose(diag, m(img, ids, att)["loss_itc"].detach())


def test_itc_soft_targets_with_the_batch_split_over_processes(monkeypatch):
    """Under DDP each process holds B rows and gathers all W*B columns, image ids included: the mean of two
    processes' ITC losses equals one process with the whole batch, one image's captions split across them."""
    from minblip2 import dist, losses

    g = torch.Generator().manual_seed(0)
    image_feats = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    text_feats = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    ids, temp = torch.tensor([5, 6, 7, 5]), torch.tensor(0.07)  # image 5 on process 0 and on process 1
    whole, _, _ = losses.itc_loss(image_feats, text_feats, temp, 0.1, image_ids=ids)
    parts = []
    for r in (0, 1):
        local = [image_feats[2 * r:2 * r + 2], text_feats[2 * r:2 * r + 2], ids[2 * r:2 * r + 2]]
        world = {id(x): full for x, full in zip(local, (image_feats, text_feats, ids))}
        monkeypatch.setattr(dist, "rank", lambda: r)
        monkeypatch.setattr(dist, "all_gather_with_grad", lambda x: world[id(x)])
        monkeypatch.setattr(dist, "all_gather_no_grad", lambda x: world[id(x)])
        parts.append(losses.itc_loss(*local[:2], temp, 0.1, image_ids=local[2])[0])
    assert torch.allclose((parts[0] + parts[1]) / 2, whole, atol=1e-6)


@pytest.mark.parametrize("fast", [True, False])
def test_query_similarity_is_measured_without_dropout(fast):
    """In training mode the term is computed on a dropout-free pass of the queries: what eval mode (stage 2,
    retrieval) will see. On the training pass itself, dropout noise alone can keep the queries apart. The model is
    left in training mode, with dropout still on for the paper's three losses."""
    m, img, ids, att = _tiny_model_and_batch(4, dropout=0.5)  # so high that a pass with it on cannot match by chance
    m.scfg.fast_passes, m.scfg.query_sim_weight = fast, 1.0
    with torch.no_grad():
        clean = losses.query_similarity(m.encode_image(img)[1])  # eval mode: no dropout
        m.train()
        noisy = losses.query_similarity(m.qformer(m.ln_vision(img)))
        out = m(img, ids, att, torch.arange(4), torch.Generator().manual_seed(0))
    assert m.training and m.qformer.training
    assert not torch.allclose(noisy, clean, atol=1e-4)  # the test can tell the two passes apart
    assert torch.allclose(out["loss_qsim"], clean, atol=1e-6)


def test_query_similarity_on_known_cases_and_its_gradient_pushes_queries_apart():
    one = F.normalize(torch.randn(3, 1, 8), dim=-1).expand(3, 4, 8)  # each image: one vector said by 4 queries
    assert torch.allclose(losses.query_similarity(one), torch.tensor(1.0))
    assert losses.query_similarity(torch.eye(4).expand(2, 4, 4)) == 0  # orthogonal queries
    assert losses.query_similarity(one[:, :1]) == 0  # one query: nothing to compare
    x = torch.randn(2, 4, 8) + 3.0  # alike: every coordinate shares a large offset
    x.requires_grad_(True)
    before = losses.query_similarity(F.normalize(x, dim=-1))
    before.backward()
    with torch.no_grad():
        after = losses.query_similarity(F.normalize(x - 0.5 * x.grad / x.grad.norm(), dim=-1))
    assert 0.5 < before < 1 and after < before


def test_query_similarity_counts_antipodal_queries_as_the_collapse_they_are():
    """8 queries at +v and 8 at -v: a signed mean cosine says -1/15 ("apart"), but it is one direction."""
    v = F.normalize(torch.randn(1, 1, 32), dim=-1)
    antipodal = torch.cat([v.expand(1, 8, 32), -v.expand(1, 8, 32)], dim=1)  # (1, 16, 32)
    q = F.normalize(antipodal, dim=-1)
    signed = ((q @ q.transpose(1, 2)).sum() - 16) / (16 * 15)
    assert signed < 0  # what the signed statistic saw
    assert torch.allclose(losses.query_similarity(antipodal), torch.tensor(1.0))  # what the term sees: collapse
    assert torch.allclose(losses.query_effective_rank(antipodal), torch.tensor(1.0), atol=1e-4)  # one direction
    assert torch.allclose(losses.query_effective_rank(torch.eye(16).expand(2, 16, 16)), torch.tensor(16.0))


def test_query_similarity_pushes_a_collapsed_image_even_when_the_rest_of_the_batch_is_apart():
    """Per image, not per batch: a clamped batch mean gave a collapsed image no gradient when the others' cosines
    were negative enough to pull the mean to or below 0."""
    torch.manual_seed(0)
    apart = -torch.eye(4)[None].expand(3, 4, 4) + 0.0  # orthogonal queries
    opposite = torch.tensor([[[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [1.0, 0, 0, 0], [-1.0, 0, 0, 0]]])  # signed mean -1/3
    collapsed = torch.tensor([[[1.0, 0.1, 0, 0], [1.0, 0, 0.1, 0], [1.0, 0, 0, 0.1], [1.0, 0.1, 0.1, 0]]])
    batch = torch.cat([apart, opposite, opposite, collapsed]).requires_grad_(True)
    losses.query_similarity(batch).backward()
    assert batch.grad[-1].abs().sum() > 1e-3  # the collapsed image is pushed
    assert batch.grad[0].abs().sum() < 1e-6  # orthogonal queries are left alone


def test_query_sim_weight_adds_the_weighted_term_to_the_loss():
    m, img, ids, att = _tiny_model_and_batch(4, pad_from=5)
    gen = lambda: torch.Generator().manual_seed(5)
    base = m(img, ids, att, None, gen())
    m.scfg.query_sim_weight = 2.0
    out = m(img, ids, att, None, gen())
    assert "loss_qsim" not in base and 0 < out["loss_qsim"] <= 1
    assert torch.allclose(out["loss"], base["loss"] + 2.0 * out["loss_qsim"], atol=1e-6)


def test_logged_temperature_is_the_value_the_step_used():
    """out["temp"] is read after the optimizer step (train() logs it, lesson 5 recomputes the log by hand): it must be
    a copy, not a view of the parameter that the step then changes."""
    m, img, ids, att = _tiny_model_and_batch(4)
    out = m.train()(img, ids, att, image_ids=torch.arange(4), generator=torch.Generator().manual_seed(0))
    used = m.temp.item()
    with torch.no_grad():
        m.temp.add_(0.01)  # what an optimizer step does to it
    assert out["temp"].item() == used


def test_dropout_free_query_pass_keeps_gradient_checkpointing():
    """Issue 27, item 9: the query-similarity term's dropout-free pass switched the Q-Former to eval mode, and
    checkpointing was on in training mode only, so that pass kept every layer's activations. Now it checkpoints
    whenever a backward follows: it keeps a fraction of what it keeps without checkpointing."""
    from minblip2.config import Stage1Config
    from minblip2.stage1 import Stage1Model

    kept, grads = {}, {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = QFormerConfig(bert_weights="random", hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                            num_queries=8, vision_width=24, vocab_size=100, max_position_embeddings=16,
                            gradient_checkpointing=ckpt)
        model = Stage1Model(cfg, Stage1Config(query_sim_weight=1.0)).train()
        img = model.ln_vision(torch.randn(2, 9, 24))
        image_kv = [None if kv is None else tuple(x.detach() for x in kv) for kv in model.qformer.image_kv(img)]
        out = {}
        kept[ckpt] = saved_for_backward_bytes(
            lambda: out.setdefault("q", model._queries_without_dropout(image_kv=image_kv)))
        assert model.qformer.training  # the mode is back before backward: the recomputation must not use it
        out["q"].pow(2).sum().backward()
        grads[ckpt] = {n: p.grad for n, p in model.qformer.named_parameters() if p.grad is not None}
    assert kept[True] < 0.25 * kept[False], kept
    assert grads[True].keys() == grads[False].keys()
    for n in grads[True]:  # checkpointed or not: the same gradients, without dropout in both
        assert torch.allclose(grads[True][n], grads[False][n], atol=1e-6), n
