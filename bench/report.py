"""results.md: the tables of sections 1-4 from the results dict (section 5's come from data_path.markdown)."""
from __future__ import annotations

from common import NUM_IMAGE_TOKENS


def mib(x):
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def fmt_ratio(r):
    return f"**{r['median']:.2f}** ({r['q1']:.2f}-{r['q3']:.2f})"


def markdown(res) -> str:
    m = res["meta"]
    L = [f"# minblip2 benchmarks{' (QUICK smoke test: tiny sizes, not results)' if m['quick'] else ''}", "",
         f"{m['date']} | {m['cpu']} | {m['threads']} threads | device {m['device']} | torch {m['torch']} | "
         f"transformers {m['transformers']} | tcmalloc preloaded: {m['tcmalloc']} | whole run {m['wall_s']:.0f} s", "",
         "Ratios are medians over rounds of within-round ratios, (in brackets) the middle half of the rounds. "
         "Absolute times move with the machine's load; trust the ratios. See README.md.", ""]
    if "vs_transformers" in res:
        v = res["vs_transformers"]
        L += ["## 1. Stage-1 step: minblip2 vs transformers' Blip2QFormerModel", "",
              f"ITC+ITM with hard negatives, fwd + bwd + clip + AdamW, batch {v['batch']}, {v['num_queries']} queries, "
              f"text length {v['text_len']}, {NUM_IMAGE_TOKENS} image tokens. Same config, same weights (losses agree "
              f"to {v['loss_parity_fp32']:.1e} in fp32), same loss code; transformers runs attention "
              f"'{v['attn_implementation_transformers']}'.", "",
              "| precision | minblip2 s/step | transformers s/step | minblip2 samples/s | transformers samples/s "
              "| **speed ratio** minblip2 / transformers | peak step memory MiB (minblip2 / transformers) | memory ratio |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ("bf16 autocast", "fp32"):
            e = v[name]
            s, sps, mem = e["seconds"], e["samples_per_s"], e["peak_step_memory_bytes"]
            mr = "n/a" if e["memory_ratio"] is None else f"{e['memory_ratio']:.2f}"
            L.append(f"| {name} | {s['minblip2']['median']:.3f} | {s['transformers']['median']:.3f} | "
                     f"{sps['minblip2']:.1f} | {sps['transformers']:.1f} | {fmt_ratio(e['speed_ratio'])} | "
                     f"{mib(mem['minblip2'])} / {mib(mem['transformers'])} | {mr} |")
        L += ["", "Speed ratio > 1: minblip2 is faster. Memory ratio < 1: minblip2 needs less.", "",
              "With `--qformer.attn_impl=math` (attention written out instead of SDPA, see section 2), minblip2's speed "
              "ratio to transformers is " + " and ".join(
                  f"{fmt_ratio(v[n]['speed_ratio_attn_math'])} ({n})" for n in ("bf16 autocast", "fp32")
                  if "speed_ratio_attn_math" in v[n]) + ".", ""]
    if "wins" in res:
        w = res["wins"]
        L += ["## 2. Each speed-up on its own", "",
              f"Stage-1 step (ITC+ITM+ITG) at the cpu preset: batch {w['batch']}, {w['num_queries']} queries, "
              f"text length {w['text_len']}. Everything else as the preset (fast passes, SDPA, bf16, cached features).", "",
              "| speed-up | variant | baseline | s variant | s baseline | **speed-up** (baseline time / variant time) "
              "| peak step memory MiB variant / baseline |", "|---|---|---|---:|---:|---:|---:|"]
        for e in w["results"]:
            base, mem = e["baseline"], e["peak_step_memory_bytes"]
            for n, r in e["speedup"].items():
                L.append(f"| {e['win']} | {n} | {base} | {e['seconds'][n]['median']:.3f} | "
                         f"{e['seconds'][base]['median']:.3f} | {fmt_ratio(r)} | {mib(mem[n])} / {mib(mem[base])} |")
        L += ["", "Speed-up > 1: the variant's step is faster than the baseline's."]
        L += [f"- *{e['win']}*: {e['what']}." for e in w["results"]]
        L.append("")
    if "stage1_flop_breakdown" in res:
        fb = res["stage1_flop_breakdown"]
        L += ["### Where a stage-1 step's FLOPs go", "",
              f"Forward pass of the step above (batch {fb['batch']}, {fb['num_queries']} queries, ITC+ITM+ITG): "
              f"{fb['total'] / 1e9:.0f} GFLOP (FlopCounterMode); the backward costs about twice as much, split alike.",
              "", "| part | GFLOP | share |", "|---|---:|---:|"]
        L += [f"| {k} | {f / 1e9:.1f} | {100 * f / fb['total']:.0f}% |" for k, f in fb["flops"].items()]
        L.append("")
    for key, title in (("scaling_stage1", "## 3a. Stage-1 step (ITC+ITM+ITG) vs batch size and queries"),
                       ("scaling_stage2", "## 3b. Stage-2 step (Q-Former -> frozen SmolLM2-135M) vs batch size and queries")):
        if key not in res:
            continue
        s = res[key]
        p = s["matmul_flops_per_s"]
        L += [title, "",
              f"Measured in the same rounds: {s['matmul_n']}x{s['matmul_n']} matmul at "
              f"{p['matmul bf16']['median'] / 1e9:.0f} GFLOP/s in bf16 and {p['matmul fp32']['median'] / 1e9:.0f} GFLOP/s "
              "in fp32. Steps run under bf16 autocast, so their FLOP/s are compared with the bf16 matmul.", "",
              "| batch | queries | s/step | samples/s | GFLOP/step | achieved GFLOP/s | **% of bf16 matmul** |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            f = r["fraction_of_bf16_matmul"]
            L.append(f"| {r['batch']} | {r['num_queries']} | {r['seconds']['median']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['flops_per_step'] / 1e9:.0f} | {r['achieved_flops_per_s'] / 1e9:.0f} | "
                     f"**{100 * f['median']:.0f}%** ({100 * f['q1']:.0f}-{100 * f['q3']:.0f}) |")
        L.append("")
    if "stage2" in res:
        s2, g = res["stage2"], res["stage2"]["generation"]
        st = s2["step"]
        L += ["## 4. Stage 2: the frozen LLM in bf16, and captioning speed", "",
              f"{s2['llm']}, {s2['num_queries']} queries, bf16 autocast. Autocast re-casts a frozen (no-grad) fp32 "
              "weight at every forward; `--llm.dtype=bfloat16` (the cpu preset) stores it in bf16 once.", "",
              f"Stage-2 training step, batch {st['batch']}: {st['seconds']['LLM fp32']['median']:.3f} s with the LLM in fp32, "
              f"{st['seconds']['LLM bf16']['median']:.3f} s in bf16: speed-up {fmt_ratio(st['speedup_bf16_llm'])}.", "",
              f"Captioning: batch {g['batch']} images of random image tokens, exactly {g['new_tokens']} new tokens per "
              "caption (min = max new tokens, so every variant writes the same length).", "",
              "| decoding | s/batch | captions/s | tokens/s |", "|---|---:|---:|---:|"]
        for k in g["seconds"]:
            L.append(f"| {k} | {g['seconds'][k]['median']:.3f} | {g['captions_per_s'][k]:.2f} | {g['tokens_per_s'][k]:.1f} |")
        L.append("")
        for dt, r in g["greedy_speedup_over_beam"].items():
            L.append(f"- LLM {dt}: greedy is {fmt_ratio(r)} x as fast as beam search ({g['num_beams']} beams).")
        for d, r in g["bf16_llm_speedup"].items():
            L.append(f"- {d}: the bf16 LLM is {fmt_ratio(r)} x as fast as the fp32 one.")
        L.append("")
    return "\n".join(L)

