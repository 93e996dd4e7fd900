"""Two small things every loop here needs: the autocast context for a config's `amp`, and a progress bar
that only the master process shows (under torchrun, N bars on one terminal are noise)."""
from __future__ import annotations

import torch

from . import dist

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str, device):
    """The autocast context for a config's `amp` ("none", "bf16", "fp16") on `device` (a no-op for "none")."""
    if amp not in AMP_DTYPES:  # a typo must not quietly train in fp32
        raise ValueError(f"amp={amp!r}: choose one of {list(AMP_DTYPES)} (e.g. --stage1.amp=bf16)")
    dtype = AMP_DTYPES[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def progress_bar(iterable, show: bool = True, **kw):
    """A tqdm bar on the master process only. Never passes disable=False, so TQDM_DISABLE=1 silences it."""
    from tqdm.auto import tqdm

    if not (show and dist.is_master()):
        kw["disable"] = True
    return tqdm(iterable, **kw)
