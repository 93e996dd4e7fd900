"""Print README's results tables (markdown) from the metrics files of `minblip2-coco-mini` (the main
job) and of `... --ablations`, when there is one:  python scripts/results_table.py [MAIN.json [ABLATIONS.json]]"""
import json
import sys
from pathlib import Path

path = sys.argv[1] if len(sys.argv) > 1 else "results/coco-mini.json"
ablations = Path(sys.argv[2] if len(sys.argv) > 2 else "results/coco-mini-ablations.json")
d = json.load(open(path))
a = json.loads(ablations.read_text()) if ablations.is_file() else {"stage1": {}, "stage2": {}, "timings_s": {}}
d["stage1"] = {**d["stage1"], **a["stage1"]}
d["stage2"] = {**a["stage2"], **d["stage2"]}  # one nearest-neighbour row: the main job's
k = d["config"].get("eval", d["config"]["stage1"])["itm_rerank_k"]
head = f"ITM re-ranks the ITC top {k}" if k else "ranked by ITC"
names1 = {"qformer": f"Q-Former (ITC+ITM+ITG), {head}", "qformer_itc_only": "same model, ranked by ITC only",
          "qformer_itm_rerank16": "same model, ITM re-ranks the ITC top 16",
          "qformer_no_itg": "Q-Former trained without ITG", "linear_probe": "linear probe (frozen pooled features)"}
keys1 = ["TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"]
print("| stage 1: retrieval, coco-mini test (192 images, 960 captions) | " + " | ".join(keys1) + " |")
print("|---|" + "---:|" * len(keys1))
for k, label in names1.items():
    if k in d["stage1"]:
        print(f"| {label} | " + " | ".join(f"{d['stage1'][k][m]:.1f}" for m in keys1) + " |")
print()
names2 = {"minblip2": "minblip2 (stage 1 -> stage 2)", "no_stage1": "stage 2 from a random Q-Former (no stage 1)",
          "no_stage1_bert": "stage 2 from a BERT-initialised Q-Former (no stage 1)",
          "linear_projection": "linear projection of pooled image tokens", "nearest_neighbour": "nearest-neighbour caption"}
keys2 = ["BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]
print("| stage 2: captioning, coco-mini test (192 images) | " + " | ".join(keys2) + " |")
print("|---|" + "---:|" * len(keys2))
for k, label in names2.items():
    if k in d["stage2"]:
        print(f"| {label} | " + " | ".join(f"{d['stage2'][k][m]:.1f}" for m in keys2) + " |")
t = d.get("timings_s", {})
if "total" in t:
    print(f"\nWall time of the main job: {t['total'] / 60:.0f} min on 2 CPU cores.")
if "total" in a["timings_s"]:
    print(f"Wall time of the ablations: {a['timings_s']['total'] / 60:.0f} min on 2 CPU cores.")
