"""What the main job's Q-Formers do, measured on coco-mini test images (run after `make run`):

    .venv/bin/python scripts/query_diagnostics.py [RUN_DIR]    # default runs/coco-mini, ~2 min (after make ablations
                                                               # too, for the ablations' runs)

Stage 1 (64 images; minblip2/tools/diagnostics.py says what each number means):
- query-query cos (1.000 = all queries output one vector), image-image cos, image-specific energy;
- per cross-attention layer: attention entropy (uniform over 257 tokens = 5.55), largest weight, weight on [CLS].
Stage 2 (96 images, first caption each): caption loss with the right image vs another image's (`gap`: what
the image is worth to the model, in nats), and the same query statistics for the soft prompt.
Writes results/query-diagnostics.json.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from minblip2 import config
from minblip2.backbones import load_bert
from minblip2.config import REPO_ROOT
from minblip2.tools.diagnostics import cross_attention_stats, image_use, query_stats
from minblip2.tools.coco_mini import TestSplit
from minblip2.stage1 import Stage1Model
from minblip2.tasks import build_stage1_model, build_stage2_model
from minblip2.checkpoint import latest_checkpoint, load_trainable_state

RUN = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "runs" / "coco-mini"
cfg = config.cpu()
_, tok = load_bert(cfg.qformer)
test = TestSplit(cfg, tok, torch.device("cpu"))
x = test.features[:64].float()
report = {"run": str(RUN), "stage1": {}, "stage2": {}}


def weights(sub: str) -> dict:
    return load_file(str(latest_checkpoint(RUN / sub / "checkpoints") / "model.safetensors"))


def stage1(name: str, m: Stage1Model):
    m.eval()
    with torch.no_grad():
        _, q = m.encode_image(x)
    report["stage1"][name] = {**query_stats(q), "cross_attention": cross_attention_stats(m.qformer, m.ln_vision(x))}
    print(name, json.dumps(report["stage1"][name]), flush=True)


torch.manual_seed(0)
stage1("random init (no BERT)", Stage1Model(cfg.qformer, cfg.stage1))
torch.manual_seed(0)
stage1("BERT init, untrained", build_stage1_model(cfg)[0])
for sub in ["stage1", "stage1_no_itg"]:
    if latest_checkpoint(RUN / sub / "checkpoints") is None:  # stage1_no_itg comes from `make ablations`
        continue
    m = Stage1Model(cfg.qformer, cfg.stage1)
    load_trainable_state(m, weights(sub))
    stage1(f"trained {sub}", m)

cfg.stage2.from_stage1 = False  # the weights come from each run's own checkpoint
model = build_stage2_model(cfg)
captions = [caps[0] for caps in test.captions[:96]]
for sub in ["stage2", "stage2_no_stage1", "stage2_no_stage1_bert"]:
    if latest_checkpoint(RUN / sub / "checkpoints") is None:  # the no-stage-1 runs come from `make ablations`
        continue
    model.load_trainable_state_dict(weights(sub))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        use = image_use(model, test.features[:96], captions)
        prompt = model.visual_prompt(x)
    report["stage2"][sub] = {**use, "prompt": query_stats(prompt)}
    print(sub, json.dumps(report["stage2"][sub]), flush=True)

out = REPO_ROOT / "results" / "query-diagnostics.json"
out.write_text(json.dumps(report, indent=2) + "\n")
print("wrote", out)
