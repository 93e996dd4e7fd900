"""Dry run: build a preset's models on the meta device -- shapes only, nothing downloaded, no memory -- and
report what would train, what stays frozen, and an ESTIMATE of the GPU memory one micro-batch needs.

    python -m minblip2.train --stage 1 --preset paper --dry_run
    python -m minblip2.train --stage 2 --preset gpu24 --dry_run --stage2.batch_size=8 --llm.name=google/flan-t5-xl

    from minblip2.dryrun import dry_run, format_report
    print(format_report(dry_run(get_preset("paper"), stage=2, batch_sizes=(1, 64))))

Parameter counts are exact: the real classes are built, only their tensors have no storage. The memory
figures are arithmetic (see `estimate_memory`): per GPU, per micro-batch (`batch_size`, not the global batch),
without the CUDA context and allocator slack (add ~1 GiB) or DDP's gradient buckets (add 4 bytes per
trainable parameter with several GPUs).
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
import transformers

from .backbones import build_llm_from_config, count_params, load_image_encoder, smollm2_source
from .config import Config, LLMConfig

# The published config.json of the paper's LLMs (architecture fields only), so a dry run needs no hub. (transformers 5
# ties T5's lm_head to its embeddings whatever tie_word_embeddings says, so FlanT5's count lacks V*d_model of it.)
PUBLISHED_LLM_CONFIGS = {
    "facebook/opt-2.7b": dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                              ffn_dim=10240, vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560,
                              do_layer_norm_before=True, activation_function="relu", bos_token_id=2, eos_token_id=2,
                              pad_token_id=1),
    "facebook/opt-6.7b": dict(model_type="opt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                              ffn_dim=16384, vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096,
                              do_layer_norm_before=True, activation_function="relu", bos_token_id=2, eos_token_id=2,
                              pad_token_id=1),
    "google/flan-t5-xl": dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_decoder_layers=24,
                              num_heads=32, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                              relative_attention_num_buckets=32, relative_attention_max_distance=128,
                              layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "google/flan-t5-xxl": dict(model_type="t5", d_model=4096, d_ff=10240, d_kv=64, num_layers=24,
                               num_decoder_layers=24, num_heads=64, vocab_size=32128, feed_forward_proj="gated-gelu",
                               tie_word_embeddings=False,
                               relative_attention_num_buckets=32, relative_attention_max_distance=128,
                               layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
}

GiB = 2**30


def llm_config(lcfg: LLMConfig):
    """The LLM's transformers config without the hub: the local HF cache (or a local folder), else the published
    configs above, else (the offline default SmolLM2) the converted cache or the GGUF's metadata."""
    try:
        return transformers.AutoConfig.from_pretrained(lcfg.name, local_files_only=True)
    except (OSError, ValueError):
        pass
    if lcfg.name in PUBLISHED_LLM_CONFIGS:
        kw = dict(PUBLISHED_LLM_CONFIGS[lcfg.name])
        return transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    if lcfg.name == LLMConfig.name:  # SmolLM2, as load_llm(weights="random") finds its shapes
        src, kw = smollm2_source()
        return transformers.AutoConfig.from_pretrained(src, **kw)
    raise ValueError(
        f"dry run: no architecture config for the LLM {lcfg.name!r} offline. Cache it once with internet "
        f"(python -c \"import transformers; transformers.AutoConfig.from_pretrained('{lcfg.name}')\"), or point "
        f"--llm.name at a local folder holding its config.json; built in: {sorted(PUBLISHED_LLM_CONFIGS)}")


def build_on_meta(cfg: Config, stage: int) -> dict:
    """{"image_encoder", "model", "llm" (stage 2)} built on the meta device: real classes, no storage."""
    from .stage1 import Stage1Model
    from .stage2 import Stage2Model

    vision = dataclasses.replace(cfg.vision, weights="random")  # the architecture, never the weights
    hf_config = llm_config(cfg.llm) if stage == 2 else None  # may read a local file: outside the meta context
    with torch.device("meta"):
        out = {"image_encoder": load_image_encoder(vision)}
        if stage == 1:
            out["model"] = Stage1Model(cfg.qformer, cfg.stage1)
        else:
            llm = build_llm_from_config(hf_config).to(getattr(torch, cfg.llm.dtype))
            # Stage2Model reads only these ids from its tokenizer (add_bos given, so it tokenizes nothing)
            ids = {k: getattr(hf_config, k, None) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
            tok = SimpleNamespace(**{**ids, "eos_token_id": ids["eos_token_id"] or 0})  # any id: counts only
            out["model"] = Stage2Model(cfg.qformer, llm, tok, prompt=cfg.llm.prompt,
                                       max_text_len=cfg.data.max_text_len, add_bos=False)
            out["llm"] = llm
    return out


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# ----------------------------------------------------------------------------- activation formulas
# Bytes a layer keeps for backward, counted as Korthikanti et al. 2022 ("Reducing Activation Recomputation in
# Large Transformer Models", eq. 2) do: 16-bit activations, 1-byte dropout masks, no recomputation. s tokens,
# b sequences, h hidden, a heads, f the FFN width. Callers scale by (bytes per activation) / 2.


def trained_layer(s, b, h, a, f):
    """A layer whose weights train: s*b*h*(34 + 5*a*s/h) for f = 4h (attention 11sbh + 5as^2b, MLP 3sbh + 4sbf,
    two LayerNorms 4sbh). The 5as^2b scores are kept although SDPA's fused kernels never store them: a small
    overestimate at Q-Former lengths."""
    return s * b * (18 * h + 4 * f) + 5 * a * s * s * b


def cross_attention(q, n, b, h, a):
    """q queries reading n image tokens, same accounting: query-projection input, Q, output-projection input,
    dropout mask and LayerNorm input 9qbh, K and V 4nbh, scores 5aqnb (the image tokens themselves: see below)."""
    return b * (9 * q * h + 4 * n * h + 5 * a * q * n)


def frozen_layer(s, b, h, f, gated):
    """A FROZEN layer that gradients flow through (stage 2's LLM, in eval mode: no dropout). A frozen Linear
    saves no input (its weight gradient is never computed), so only LayerNorm inputs 4sbh, the attention's
    q, k, v and output 8sbh, and the activation 2sbf (gated MLPs: 6sbf, the gate's input and both factors)."""
    return s * b * (12 * h + (6 if gated else 2) * f)


# ----------------------------------------------------------------------------- the estimate


def estimate_memory(cfg: Config, stage: int, built: dict, b: int) -> dict[str, int]:
    """Peak GPU bytes for one micro-batch of b samples, by part. An ESTIMATE (formulas above): fine for
    choosing a batch size, not for filling a GPU to the last GiB."""
    t = cfg.stage1 if stage == 1 else cfg.stage2
    qc, enc, model = cfg.qformer, built["image_encoder"], built["model"]
    amp = t.amp in ("bf16", "fp16")
    scale = 1 if amp else 2  # the formulas count 16-bit activations; fp32 doubles them
    ckpt = qc.gradient_checkpointing
    N, Dv = enc.num_tokens, enc.num_features  # image tokens and their width
    Q, h, a, f, L = qc.num_queries, qc.hidden_size, qc.num_heads, qc.intermediate_size, qc.num_layers
    n_cross = len(range(0, L, qc.cross_attention_freq))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in list(model.parameters()) + list(enc.parameters()) if not p.requires_grad]

    parts = {
        "frozen weights": _bytes(frozen),  # image encoder (+ LLM), at their own dtype
        # fp32 weights + fp32 grads + AdamW's two fp32 moments = 16 B/param; autocast caches a 16-bit copy (+2)
        "trained weights, grads, AdamW": sum(p.numel() for p in trainable) * (18 if amp else 16),
    }

    # The frozen image encoder runs under no_grad: each block's tensors are freed once used, so only about
    # one block is alive -- the residual stream in and out plus the MLP's hidden (fused attention: no s x s).
    # Cached features skip it altogether (they are read from the cache instead).
    if not t.cache_features:
        mlp = getattr(getattr(enc.model.blocks[0], "mlp", None), "fc1", None)
        f_v = mlp.out_features if mlp is not None else 4 * Dv
        nbytes = enc.model.patch_embed.proj.weight.element_size()
        parts["act: image encoder (no_grad)"] = b * N * (2 * Dv + f_v) * nbytes

    # Q-Former passes as (sequences, tokens, with queries?). Stage 1: ITC (queries + text), ITM (3b: positives
    # and both kinds of negatives), ITG (text only when it reuses the queries' keys/values). Stage 2: queries only.
    T = cfg.data.max_text_len
    if stage == 1:
        losses = set(cfg.stage1.losses)
        passes = [(b, Q + T, True)]
        if "itm" in losses:
            passes.append((3 * b, Q + T, True))
        if "itg" in losses:
            passes.append((b, T, False) if cfg.stage1.itg_reuse_queries else (b, Q + T, True))
    else:
        passes = [(b, Q, True)]

    kept = 0
    for rows, s, queries in passes:  # all L layers, n_cross of them with cross-attention to the image
        full = L * trained_layer(s, rows, h, a, f) + (n_cross * cross_attention(Q, N, rows, h, a) if queries else 0)
        kept += L * 2 * s * rows * h if ckpt else full  # checkpointing: each layer keeps only its input (2sbh)...
    if ckpt:  # ...and backward recomputes one layer at a time
        kept += max(trained_layer(s, r, h, a, f) + (cross_attention(Q, N, r, h, a) if q else 0) for r, s, q in passes)
    parts["act: Q-Former"] = scale * kept

    # The image tokens on the trained side, fp32: the encoder's output and ln_vision's, plus stage 1 ITM's 3b
    # concatenation. Under autocast the key AND the value Linear of every cross-attention layer each save their
    # own 16-bit cast of them -- often the biggest single item. With checkpointing: one layer's casts at a time.
    reads = [r // b for r, _, q in passes if q]  # image copies per sample each pass reads: ITC 1, ITM 3
    fp32_copies = 2 + (3 if stage == 1 and "itm" in cfg.stage1.losses else 0)
    casts = (2 * max(reads) if ckpt else 2 * n_cross * sum(reads)) if amp else 0
    parts["act: image tokens"] = b * N * Dv * (4 * fp32_copies + 2 * casts)

    # Logits: 16-bit (or fp32) logits, their fp32 copy and cross-entropy's fp32 log-softmax, for the target rows.
    if stage == 1:
        if "itg" in set(cfg.stage1.losses):
            parts["act: logits + loss"] = b * T * qc.vocab_size * ((2 if amp else 4) + 8)
    else:
        parts.update(_llm_activations(cfg, built["llm"], b, Q, T))
    parts["total"] = sum(parts.values())
    return parts


def _llm_activations(cfg: Config, llm, b: int, Q: int, T: int) -> dict[str, int]:
    """Stage 2's frozen LLM still keeps activations: the gradient flows back through every layer to the
    soft prompt. Tokens: Q queries + prompt (~1 token per word, + BOS) + caption (<= max_text_len, with EOS)."""
    c = llm.config
    p = llm.get_input_embeddings().weight.element_size()
    h, V = c.hidden_size, c.vocab_size
    f = getattr(c, "ffn_dim", None) or getattr(c, "intermediate_size", None) or c.d_ff  # OPT / Llama / T5
    gated = any(n.endswith(("gate_proj", "wi_0")) for n, _ in llm.named_modules())
    text = T + len(cfg.llm.prompt.split()) + 1
    if c.is_encoder_decoder:  # encoder: queries + prompt (+ caption prefix); decoder: the caption (+ cross-attention)
        s_enc, s_dec = Q + text, T
        acts = (c.num_layers * frozen_layer(s_enc, b, h, f, gated)
                + c.num_decoder_layers * (frozen_layer(s_dec, b, h, f, gated) + 4 * b * h * (s_dec + s_enc)))
        logits = b * T * V * (p + 8)
    else:
        s = Q + text
        acts = c.num_hidden_layers * frozen_layer(s, b, h, f, gated)
        logits = b * s * V * p + b * T * V * 8  # logits at every position, fp32 only for the caption's
    return {"act: LLM (frozen, grads pass through)": acts * p // 2, "act: logits + loss": logits}


# ----------------------------------------------------------------------------- report


def dry_run(cfg: Config, stage: int, batch_sizes=(1, 8, 32)) -> dict:
    """Build `stage` of `cfg` on the meta device; return parameter counts per component and the memory
    estimate for each batch size (the preset's own batch size is always included)."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, not {stage!r}")
    t = cfg.stage1 if stage == 1 else cfg.stage2
    built = build_on_meta(cfg, stage)
    enc, model = built["image_encoder"], built["model"]

    def row(name, module, counts=None):
        counts = counts or count_params(module)
        return {"name": name, **counts, "dtype": str(next(module.parameters()).dtype).removeprefix("torch.")}

    components = [row(f"image encoder {cfg.vision.name}", enc)]
    if stage == 1:
        components.append(row("Q-Former + heads (stage 1)", model))
    else:
        llm = count_params(built["llm"])
        whole = count_params(model)
        components.append(row("ln_vision + Q-Former queries + llm_proj", model,
                              {k: whole[k] - llm[k] for k in whole}))
        components.append(row(f"LLM {cfg.llm.name}", built["llm"], llm))

    sizes = sorted(set(batch_sizes) | {t.batch_size})
    return {
        "stage": stage,
        "components": components,
        "trainable": sum(c["trainable"] for c in components),
        "frozen": sum(c["frozen"] for c in components),
        "batch_size": t.batch_size,
        "settings": f"amp={t.amp}, Q-Former checkpointing={'on' if cfg.qformer.gradient_checkpointing else 'off'}, "
                    f"image features {'cached' if t.cache_features else 'computed each step'}",
        "memory": {b: estimate_memory(cfg, stage, built, b) for b in sizes},
        "modules": built,
    }


def format_report(r: dict) -> str:
    lines = [f"dry run, stage {r['stage']}: shapes only (meta device), nothing downloaded or allocated", ""]
    w = max(len(c["name"]) for c in r["components"]) + 2
    lines.append(f"{'component':<{w}}{'trainable':>14}{'frozen':>14}  dtype")
    for c in r["components"]:
        lines.append(f"{c['name']:<{w}}{c['trainable'] / 1e6:>13.1f}M{c['frozen'] / 1e6:>13.1f}M  {c['dtype']}")
    lines.append(f"{'total':<{w}}{r['trainable'] / 1e6:>13.1f}M{r['frozen'] / 1e6:>13.1f}M")
    lines += ["", "ESTIMATED peak GPU memory per GPU in GiB, by micro-batch size (* = the preset's)",
              f"{r['settings']}; not counted: the CUDA context (~1 GiB), DDP's gradient buckets"]
    sizes = list(r["memory"])
    keys = list(dict.fromkeys(k for m in r["memory"].values() for k in m))
    w = max(len(k) for k in keys) + 2
    marked = [f"{b}*" if b == r["batch_size"] else str(b) for b in sizes]
    lines.append(f"{'batch size':<{w}}" + "".join(f"{m:>9}" for m in marked))
    for k in keys:
        lines.append(f"{k:<{w}}" + "".join(f"{r['memory'][b].get(k, 0) / GiB:>9.2f}" for b in sizes))
    return "\n".join(lines)
