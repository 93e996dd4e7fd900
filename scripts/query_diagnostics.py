"""What the stage-1 queries hand to stage 2, measured on 64 test images (run after `make run`):

    .venv/bin/python scripts/query_diagnostics.py [RUN_DIR]    # default runs/coco-mini

- query-query cos: mean cosine between different queries of one image (1.000 = all queries output one vector);
- image-image cos: mean cosine between different images (their query outputs averaged);
- image-specific energy: the share of the outputs that is NOT common to all images.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minblip2 import config
from minblip2.backbones import load_bert
from minblip2.config import REPO_ROOT
from minblip2.run import TestSplit
from minblip2.stage1 import Stage1Model
from minblip2.tasks import build_stage1_model
from minblip2.train import latest_checkpoint, load_trainable_state

RUN = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "runs" / "coco-mini"
cfg = config.cpu()
dev = torch.device("cpu")
_, tok = load_bert(cfg.qformer)
test = TestSplit(cfg, tok, dev)
x = test.features[:64].float()


def stats(name, m):
    m.eval()
    with torch.no_grad():
        _, q = m.encode_image(x)  # (B, Q, H)
    mean_q = q.mean(1)  # per-image
    qq = F.cosine_similarity(q[:, :, None], q[:, None], dim=-1)
    offdiag = qq[:, ~torch.eye(q.shape[1], dtype=torch.bool)].mean()
    ii = F.cosine_similarity(mean_q[:, None], mean_q[None], dim=-1)
    ii_off = ii[~torch.eye(len(ii), dtype=torch.bool)].mean()
    centered = q - q.mean(0, keepdim=True)  # remove what all images share
    frac = (centered.pow(2).sum() / q.pow(2).sum()).item()
    print(f"{name:24} query-query cos {offdiag:.3f} | image-image cos {ii_off:.3f} | "
          f"image-specific energy {100 * frac:.1f}% | norm {q.norm(dim=-1).mean():.1f}")


torch.manual_seed(0)
rand = Stage1Model(cfg.qformer, cfg.stage1)
stats("random init (no BERT)", rand)
torch.manual_seed(0)
fresh, _ = build_stage1_model(cfg)
stats("BERT init, untrained", fresh)
for d in ["stage1", "stage1_no_itg"]:
    m = Stage1Model(cfg.qformer, cfg.stage1)
    load_trainable_state(m, load_file(str(latest_checkpoint(RUN / d / "checkpoints") / "model.safetensors")))
    stats(f"trained {d}", m)
