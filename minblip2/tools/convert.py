"""Weight converters between minblip2 and Hugging Face's BLIP-2 module names.

transformers' `Blip2QFormerModel`, `Blip2ForImageTextRetrieval` and `Blip2ForConditionalGeneration`
(and the released checkpoints Salesforce/blip2-itm-vit-g, Salesforce/blip2-opt-2.7b) use these names.
"""
from __future__ import annotations

import torch


def hf_qformer_key_map(num_layers: int, cross_attention_freq: int, hf_prefix: str = "qformer.",
                       text_ffn: bool = True) -> dict[str, str]:
    """minblip2 QFormer key -> HF key (inside Blip2QFormerModel, under `hf_prefix`)."""
    m = {"embed_norm.weight": f"{hf_prefix}layernorm.weight", "embed_norm.bias": f"{hf_prefix}layernorm.bias"}
    for i in range(num_layers):
        h, q = f"{hf_prefix}encoder.layer.{i}.", f"layers.{i}."
        blocks = [("self_attn", "attention")]
        if i % cross_attention_freq == 0:
            blocks.append(("cross_attn", "crossattention"))
        for wb in ("weight", "bias"):
            for ours, theirs in blocks:
                for n in ("query", "key", "value"):
                    m[f"{q}{ours}.{n}.{wb}"] = f"{h}{theirs}.attention.{n}.{wb}"
                m[f"{q}{ours}.out.{wb}"] = f"{h}{theirs}.output.dense.{wb}"
                m[f"{q}{ours}.norm.{wb}"] = f"{h}{theirs}.output.LayerNorm.{wb}"
            ffns = [("query_ffn", "intermediate_query", "output_query")]
            if text_ffn:
                ffns.append(("text_ffn", "intermediate", "output"))
            for ours, inter, outp in ffns:
                m[f"{q}{ours}.fc1.{wb}"] = f"{h}{inter}.dense.{wb}"
                m[f"{q}{ours}.fc2.{wb}"] = f"{h}{outp}.dense.{wb}"
                m[f"{q}{ours}.norm.{wb}"] = f"{h}{outp}.LayerNorm.{wb}"
    return m


@torch.no_grad()
def load_hf_qformer(qformer, hf_state: dict, query_tokens_key: str = "query_tokens", hf_prefix: str = "qformer.",
                    embeddings_prefix: str | None = "embeddings.", text_ffn: bool = True) -> list[str]:
    """Copy a HF BLIP-2 Q-Former (plus query tokens and text embeddings) into a minblip2 QFormer.

    Returns the minblip2 keys that had no HF counterpart (e.g. the text parts for a generation checkpoint).
    """
    cfg = qformer.cfg
    pairs = hf_qformer_key_map(cfg.num_layers, cfg.cross_attention_freq, hf_prefix, text_ffn)
    pairs["query_tokens"] = query_tokens_key
    if embeddings_prefix is not None:
        pairs["word_embeddings.weight"] = f"{embeddings_prefix}word_embeddings.weight"
        pairs["position_embeddings.weight"] = f"{embeddings_prefix}position_embeddings.weight"
    own = qformer.state_dict()
    for ours, theirs in pairs.items():
        if theirs not in hf_state:
            raise KeyError(f"HF state dict has no {theirs!r} (for minblip2's {ours!r}): is the config the same?")
        src = hf_state[theirs]
        dst = own[ours]
        if ours == "word_embeddings.weight" and src.shape[0] != dst.shape[0]:
            n = min(src.shape[0], dst.shape[0])
            dst[:n].copy_(src[:n])
            continue
        if src.shape != dst.shape:
            raise ValueError(f"{theirs} has shape {tuple(src.shape)}, minblip2's {ours} {tuple(dst.shape)}")
        dst.copy_(src)
    return sorted(set(own) - set(pairs))


@torch.no_grad()
def load_hf_retrieval(stage1_model, hf_state: dict):
    """Blip2ForImageTextRetrieval (Salesforce/blip2-itm-vit-g layout) -> minblip2 Stage1Model.

    HF folds BLIP-2's `ln_vision` into its vision tower as `vision_model.post_layernorm`.
    """
    load_hf_qformer(stage1_model.qformer, hf_state)
    for ours, theirs in [("vision_proj", "vision_projection"), ("text_proj", "text_projection"),
                         ("itm_head", "itm_head"), ("ln_vision", "vision_model.post_layernorm")]:
        getattr(stage1_model, ours).weight.copy_(hf_state[f"{theirs}.weight"])
        getattr(stage1_model, ours).bias.copy_(hf_state[f"{theirs}.bias"])


@torch.no_grad()
def load_hf_blip2_generation(stage2_model, hf_state: dict) -> None:
    """Blip2ForConditionalGeneration (Salesforce/blip2-opt-2.7b, blip2-flan-t5-xl layout) -> minblip2 Stage2Model.

    query_tokens + qformer.* -> qformer (query path only: the generation checkpoints have no text FFN),
    vision_model.post_layernorm -> ln_vision, language_projection -> llm_proj, language_model.* -> llm.
    The Stage2Model must be built with matching QFormerConfig and LLM config (and that LLM's tokenizer).
    """
    load_hf_qformer(stage2_model.qformer, hf_state, embeddings_prefix=None, text_ffn=False)
    for ours, theirs in [("ln_vision", "vision_model.post_layernorm"), ("llm_proj", "language_projection")]:
        getattr(stage2_model, ours).weight.copy_(hf_state[f"{theirs}.weight"])
        getattr(stage2_model, ours).bias.copy_(hf_state[f"{theirs}.bias"])
    llm = stage2_model.llm
    lm_state = {k.removeprefix("language_model."): v for k, v in hf_state.items() if k.startswith("language_model.")}
    missing, unexpected = llm.load_state_dict(lm_state, strict=False)
    own = llm.state_dict()
    loaded = {own[k].data_ptr() for k in lm_state if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded]  # tied weights are often saved once
    if missing or unexpected:
        raise KeyError(f"language model mismatch: missing {missing[:5]}..., unexpected {unexpected[:5]}...")
