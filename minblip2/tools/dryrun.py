"""Dry run: build a preset's models on the meta device -- shapes only, nothing downloaded, no memory -- and
report what would train, what stays frozen, and an ESTIMATE of the GPU memory one micro-batch needs.

    minblip2-train --stage 1 --preset paper --dry_run
    minblip2-train --stage 2 --preset gpu24 --dry_run --stage2.batch_size=8 --llm.name=google/flan-t5-xl \\
        --llm.dtype=bfloat16 --stage2.amp=bf16

    from minblip2.tools.dryrun import dry_run, format_report
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

from ..backbones import build_llm_from_config, count_params, load_image_encoder
from ..offline_weights import smollm2_source
from ..config import Config, LLMConfig, check_llm_precision

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
    from ..stage1 import Stage1Model
    from ..stage2 import Stage2Model

    vision = dataclasses.replace(cfg.vision, weights="random")  # the architecture, never the weights
    hf_config = llm_config(cfg.llm) if stage == 2 else None  # may read a local file: outside the meta context
    with torch.device("meta"):
        out = {"image_encoder": load_image_encoder(vision)}
        if stage == 1:
            out["model"] = Stage1Model(cfg.qformer, cfg.stage1)
        else:
            llm = build_llm_from_config(hf_config).to(getattr(torch, "bfloat16" if cfg.llm.dtype == "auto" else cfg.llm.dtype))  # auto: as on a bf16 GPU
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
# Bytes a layer keeps for backward, counted tensor by tensor as in Korthikanti et al. 2022 ("Reducing Activation
# Recomputation in Large Transformer Models", eq. 2: 1-byte dropout masks, no recomputation) but for what
# PyTorch's autocast really saves, which is more than their all-16-bit model: LayerNorms run in fp32 (their
# inputs and outputs are fp32), and each Linear saves its OWN 16-bit cast of an fp32 input (the query, key and
# value projections: three casts of one tensor). s rows, b sequences, h hidden, a heads, f the FFN width, p bytes
# per activation (2 under autocast, 4 in fp32). `fused`: the attention runs in a fused SDPA kernel (GPUs), which
# keeps no s x s matrices. Unfused (CPUs; attn_impl="math") it keeps the fp32 probabilities, the dropout mask
# and its fp32 output (9 bytes per score), and CPU's SDPA fallback also fp32 copies of q, k and v (see `_unfused`).
# The formulas were checked against the CPU allocation profiler, with and without gradient checkpointing, in
# bf16 and fp32 (tests/test_dryrun.py).


def _unfused(rows, keys, b, h, a):
    """What unfused attention keeps beyond the fused kernels, in bytes: 9 per score, and the fp32 copies of q, k
    and v that PyTorch's CPU fallback makes (written-out attention keeps fewer: an over-count there)."""
    return b * (9 * a * rows * keys + 4 * (rows + 2 * keys) * h)


def trained_layer(s, b, h, a, f, p=2, fused=True, keys=None):
    """A Q-Former layer whose weights train (self-attention + FFN), in bytes; `keys` (default s) the keys each row
    sees (ITG: the cached queries too). Per row: the projections' inputs (3 casts under autocast, the fp32 input
    once in fp32), q and the attention output (2p), the output projection's input (p), two dropout masks (2), two
    fp32 LayerNorm inputs (8), the FFN's input (p) and its two f-wide activations (2pf); k and v per key (2p).
    At p=2: 28sbh + 4sbf (Korthikanti's count: 18sbh + 4sbf)."""
    keys = keys or s
    proj_in = 3 * p if p == 2 else 4
    out = s * b * ((proj_in + 2 * p + p + 2 + 8 + p) * h + 2 * p * f) + 2 * p * keys * b * h
    return out if fused else out + _unfused(s, keys, b, h, a)


def cross_attention(q, n, b, h, a, p=2, fused=True):
    """q queries reading n image tokens, in bytes, query side: the query projection's input, q, the output and the
    output projection's input, a dropout mask, the fp32 LayerNorm input (13qbh under autocast). The image's keys
    and values (and what their projections keep) are counted with the image tokens, see `image_side`."""
    out = q * b * h * ((p if p == 2 else 4) + 3 * p + 1 + 4)
    return out if fused else out + _unfused(q, n, b, h, a)


def frozen_layer(s, b, h, f, gated):
    """A FROZEN layer that gradients flow through (stage 2's LLM, in eval mode: no dropout). A frozen Linear
    saves no input (its weight gradient is never computed), so only LayerNorm inputs 4sbh, the attention's
    q, k, v and output 8sbh, and the activation 2sbf (gated MLPs: 6sbf, the gate's input and both factors)."""
    return s * b * (12 * h + (6 if gated else 2) * f)


def image_side(b, N, Dv, h, n_cross, kv_rows, amp):
    """Bytes the trained side keeps for the image tokens (b images, N tokens of width Dv): the fp32 tokens ln_vision
    saved, the keys and values (16-bit under amp) of n_cross cross-attention layers for `kv_rows` rows, and what
    their key/value projections save: under autocast each of the 2 * n_cross Linears its own 16-bit cast of the
    tokens (often the biggest single item), in fp32 the normalised tokens once."""
    p = 2 if amp else 4
    tokens = b * N * Dv
    kept = 4 * tokens + (2 * 2 * n_cross * tokens if amp else 4 * tokens)  # ln_vision's input; the projections'
    return kept + kv_rows * N * h * 2 * n_cross * p


# ----------------------------------------------------------------------------- the estimate


def estimate_memory(cfg: Config, stage: int, built: dict, b: int, device_type: str = "cuda") -> dict[str, int]:
    """Peak GPU bytes for one micro-batch of b samples, by part. An ESTIMATE (formulas above): fine for
    choosing a batch size, not for filling a GPU to the last GiB. device_type="cpu": the same on a CPU, whose
    attention is never fused in training (what the tests measure)."""
    t = cfg.stage1 if stage == 1 else cfg.stage2
    qc, enc, model = cfg.qformer, built["image_encoder"], built["model"]
    amp = t.amp in ("bf16", "fp16", "auto")  # auto: bf16 or fp16 on a GPU
    p = 2 if amp else 4  # bytes of one activation
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

    # Q-Former passes as (sequences, tokens, with queries?). Stage 1: ITC (queries + text: one pass with
    # fast_passes, else two), ITM (3b: positives and both kinds of negatives), ITG (text only with fast_passes: it
    # reuses the queries' keys/values). Stage 2: queries only.
    T = cfg.data.max_text_len
    losses = set(cfg.stage1.losses) if stage == 1 else set()
    if stage == 1:
        fast = cfg.stage1.fast_passes
        passes = [(b, Q + T, True)] if fast else [(b, Q, True), (b, T, False)]
        if "itm" in losses:
            passes.append((3 * b, Q + T, True))
        if "itg" in losses:
            passes.append((b, T, False) if fast else (b, Q + T, True))
    else:
        passes = [(b, Q, True)]

    fused = qc.attn_impl == "sdpa" and device_type == "cuda"

    def layers(rows, s, queries, n, n_cross):  # bytes n layers keep, n_cross of them with cross-attention
        keys = Q + s if (stage == 1 and not queries) else s  # ITG reads the cached queries' keys and values
        return (n * trained_layer(s, rows, h, a, f, p, fused, keys)
                + (n_cross * cross_attention(Q, N, rows, h, a, p, fused) if queries else 0))

    # the embeddings of every pass: LayerNorm input (fp32: autocast runs LayerNorm in fp32) and dropout mask
    kept = sum(5 * rows * s * h for rows, s, _ in passes)
    if not ckpt:
        kept += sum(layers(*ps, L, n_cross) for ps in passes)
    else:
        # checkpointing: each layer keeps only its input, fp32 (a LayerNorm's output, also under autocast) ...
        kept += sum(L * 4 * s * rows * h for rows, s, _ in passes)
        if stage == 1 and cfg.stage1.fast_passes and "itg" in losses:  # ... ITC's keys/values, for ITG
            kept += L * 2 * b * (Q + T) * h * p
        kept += max(layers(*ps, 1, 1) for ps in passes)  # ... and backward recomputes one layer at a time
    parts["act: Q-Former"] = kept

    # The image tokens on the trained side (see image_side). Stage 1 projects every cross-attention layer's keys
    # and values once, OUTSIDE the layers (ITC and ITM share them): gradient checkpointing does not free them,
    # and ITM adds its 3b rows [image, negative image, image] concatenated plus the b negatives gathered.
    # Stage 2's layers project their own: checkpointed, they keep only their input (the fp32 tokens) and
    # backward recomputes one layer's keys and values at a time.
    if stage == 1:
        kv_rows = 5 * b if "itm" in losses else b
        parts["act: image tokens"] = image_side(b, N, Dv, h, n_cross, kv_rows, amp)
    elif ckpt:
        parts["act: image tokens"] = image_side(b, N, Dv, h, 1, b, amp) + (4 * b * N * Dv if amp else 0)
    else:
        parts["act: image tokens"] = image_side(b, N, Dv, h, n_cross, b, amp)

    # Logits: 16-bit (or fp32) logits, their fp32 copy and cross-entropy's fp32 log-softmax, for the target rows.
    if stage == 1:
        if "itg" in losses:  # + the LM head's dense, GELU and LayerNorm inputs
            parts["act: logits + loss"] = b * T * qc.vocab_size * ((2 + 8) if amp else (4 + 4)) + (10 if amp else 16) * b * T * h
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
    if stage == 2:
        check_llm_precision(cfg)  # a FlanT5 in fp16 would overflow: say so before anyone pays for GPUs
    t = cfg.stage1 if stage == 1 else cfg.stage2
    built = build_on_meta(cfg, stage)
    enc, model = built["image_encoder"], built["model"]

    def row(name, module, counts=None, trainable_only=False):
        counts = counts or count_params(module)
        params = (p for p in module.parameters() if p.requires_grad or not trainable_only)
        return {"name": name, **counts, "dtype": str(next(params).dtype).removeprefix("torch.")}

    components = [row(f"image encoder {cfg.vision.name}", enc)]
    if stage == 1:
        components.append(row("Q-Former + heads (stage 1)", model))
    else:
        llm = count_params(built["llm"])
        whole = count_params(model)
        components.append(row("ln_vision + Q-Former queries + llm_proj", model,
                              {k: whole[k] - llm[k] for k in whole}, trainable_only=True))
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
        "grad_accum": t.grad_accum,
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
    if r["stage"] == 1:
        lines.append(f"ITC/ITM negatives per step: micro-batch x processes ({r['batch_size']} x P), not the global batch "
                     f"(x {r['grad_accum']} accumulation): a larger micro-batch means more negatives")
    if "checkpointing=on" in r["settings"]:
        lines.append("caution: with checkpointing an H100 measured MORE than this (gpu24, micro-batch 32: 11.7 GiB vs 7.1 "
                     "estimated; the CPU profiler agrees with the estimate): measure yours with scripts/gpu_check.py")
    sizes = list(r["memory"])
    keys = list(dict.fromkeys(k for m in r["memory"].values() for k in m))
    w = max(len(k) for k in keys) + 2
    marked = [f"{b}*" if b == r["batch_size"] else str(b) for b in sizes]
    lines.append(f"{'batch size':<{w}}" + "".join(f"{m:>9}" for m in marked))
    for k in keys:
        lines.append(f"{k:<{w}}" + "".join(f"{r['memory'][b].get(k, 0) / GiB:>9.2f}" for b in sizes))
    return "\n".join(lines)
