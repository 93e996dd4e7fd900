"""Checkpoints: the trainable weights (safetensors) + optimizer, scaler, step, every process's RNG and the data
position, written atomically, so that a run killed at any moment resumes exactly where it was.

    runs/<name>/stage1/checkpoints/ckpt-0000200/{model.safetensors, state.pt, config.json}
    runs/<name>/stage1/checkpoints/latest          -> "ckpt-0000200"

state.pt holds tensors and plain values only (numbers, strings, lists, dicts; the numpy and Python random states
as tensors), so that resuming reads it with `torch.load(weights_only=True)`: a run directory from someone else
cannot run code on --resume. A state.pt that needs more is refused; one written by an older minblip2 (numpy arrays
in it) is converted once with `python -m minblip2.checkpoint --upgrade CKPT_DIR`, for files you trust.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import dist
from .config import Config


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable weights only (the frozen encoder/LLM are never saved); tied weights once."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor], source: str = "checkpoint"):
    """Load weights saved by `trainable_state`, with an error that names every mismatch."""
    own = dict(getattr(model, "module", model).named_parameters())
    want = {n for n, p in own.items() if p.requires_grad}
    problems = [f"missing {k}" for k in sorted(want - set(state))]
    problems += [f"unexpected {k}" for k in sorted(set(state) - set(own))]
    problems += [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise ValueError(f"{source} does not fit this model (was it written with another config? compare its "
                         f"config.json with yours): " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, scaler, cfg: Config, keep: int = 2,
                    rng: list | None = None, data_state=None) -> Path:
    """Write ckpt-<step>/ into a temp dir, rename it into place, then point `latest` at it (both atomic).

    A crash at any moment leaves `latest` naming a complete checkpoint: a half-written one is never read.
    rng: every process's random state, in rank order (`dist.all_gather_object(rng_state())`); default this one's.
    """
    final = ckpt_root / f"ckpt-{step:07d}"
    tmp = ckpt_root / f".tmp-ckpt-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "model.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng or [rng_state()],
                "data_state": data_state},  # a streamed source's position (tasks.py); None: the step says it
               tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write(ckpt_root / "latest", final.name)
    for old in sorted(ckpt_root.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ptr = ckpt_root / "latest"
    if not ptr.exists():
        return None
    path = ckpt_root / ptr.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: Path, model, optimizer=None, scaler=None, task=None) -> int:
    """Restore weights (+ optimizer, scaler and RNG when given, + the data position when a task is given);
    returns the step to continue from."""
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a class or function: never unpickle it
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {path}: refusing to load state.pt, which holds more than tensors and plain values "
            f"({why[:200]}); unpickling it could run arbitrary code. A checkpoint written by minblip2 never needs "
            f"that. If it is your own, written by an older minblip2 (numpy random states), convert it once with "
            f"`python -m minblip2.checkpoint --upgrade {path}` -- only for a file you trust") from None
    except Exception as e:  # truncated / corrupt files
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to start "
                         f"over, or point `latest` in {path.parent} at an older ckpt-* directory") from e
    load_trainable_state(model, weights, source=f"checkpoint {path}")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # torch's message names no file and no way out
            raise ValueError(f"checkpoint {path} holds optimizer state for other parameter groups than this run's "
                             f"({e}): it was written by another config (learning-rate groups, frozen parts) or an "
                             f"older minblip2; compare {path / 'config.json'} with yours, or delete "
                             f"{path.parent.parent} to train this run from the start") from e
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if optimizer is not None:  # a real resume: continue the random streams too, each process its own
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # a dict: written by one process
        if dist.rank() < len(rngs):
            _set_rng_state(rngs[dist.rank()])
        if len(rngs) != dist.world_size() and dist.is_master():
            print(f"note: {path} was written by {len(rngs)} process(es), this run has {dist.world_size()}: the data "
                  f"order is the same, the random streams (dropout) are not those of an uninterrupted run")
    if task is not None and hasattr(task, "load_data_state"):
        task.load_data_state(state.get("data_state"))
    return state["step"]


def rng_state():
    """This process's random state. Under DDP each process has its own (seeded seed + rank: its own dropout
    masks), so a checkpoint keeps every process's, in rank order. CUDA: this process's GPU only (asking for
    every GPU's state would open a CUDA context on each of them, in every process). numpy's and Python's states
    become tensors and plain values (see the module docstring: weights_only loading)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None,
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": _python_state_to_plain(random.getstate())}


def _numpy_state_to_plain(st) -> dict:
    """np.random.get_state()'s ('MT19937', uint32 array of 624, pos, has_gauss, cached_gaussian) -> tensors/values."""
    name, key, pos, has_gauss, cached = st
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _python_state_to_plain(st) -> dict:
    """random.getstate()'s (version, 625 ints below 2**32, gauss_next) -> tensors/values."""
    version, internal, gauss = st
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss}


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda")
    if isinstance(cuda, list):  # older checkpoints: every GPU's state
        cuda = cuda[torch.cuda.current_device()] if cuda and torch.cuda.is_available() else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    n = s["numpy"]
    np.random.set_state((n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))


def upgrade_checkpoint(path: Path) -> Path:
    """Rewrite a state.pt written by an older minblip2 (numpy arrays and tuples in its random states) in today's
    format, which loads with weights_only=True. This one unpickles the old file: call it for your own files only."""
    path = Path(path)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)  # trusted by the caller
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    for r in rngs:
        if isinstance(r.get("numpy"), tuple):
            r["numpy"] = _numpy_state_to_plain(r["numpy"])
        if isinstance(r.get("python"), tuple):
            r["python"] = _python_state_to_plain(r["python"])
    state["rng"] = rngs
    tmp = path / f".state.pt.tmp{os.getpid()}"
    torch.save(state, tmp)
    torch.load(tmp, map_location="cpu", weights_only=True)  # proves the new file is safe to load
    os.replace(tmp, path / "state.pt")
    return path / "state.pt"


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minblip2.checkpoint", description=upgrade_checkpoint.__doc__)
    p.add_argument("--upgrade", nargs="+", metavar="CKPT_DIR", required=True,
                   help="checkpoint directories (ckpt-*) whose state.pt to rewrite in today's safe format")
    for d in p.parse_args(argv).upgrade:
        print(f"rewrote {upgrade_checkpoint(Path(d))}")


if __name__ == "__main__":
    main()
