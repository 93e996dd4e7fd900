"""amp="auto" / llm.dtype="auto": bf16 only where this machine's bf16 matmul is fast, decided by a measurement that
is cached per machine; an explicit setting always wins; train() records the choice in config.json and says it."""
import json

import pytest
import torch

from minblip2 import runtime
from minblip2.config import cpu
from minblip2.train import train

from ddp_worker import tiny_config, tiny_task


@pytest.fixture
def rates(monkeypatch, tmp_path):
    """Pretend this CPU multiplies at the given GFLOP/s; counts the measurements; a fresh cache dir."""
    monkeypatch.setenv("MINBLIP2_CACHE", str(tmp_path / "cache"))
    measured = []

    def set_rates(fp32, bf16):
        def fake(dtype, *a, **k):
            measured.append(dtype)
            return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]
        monkeypatch.setattr(runtime, "_matmul_gflops", fake)
        runtime.cpu_matmul_rates.cache_clear()
        return measured

    yield set_rates
    runtime.cpu_matmul_rates.cache_clear()


@pytest.mark.parametrize("fp32,bf16,amp,dtype", [
    (340.0, 1900.0, "bf16", "bfloat16"),  # a Xeon with AMX
    (334.0, 146.0, "none", "float32"),  # a Xeon with AVX512-BF16, no AMX (bench/results.md)
    (110.0, 0.3, "none", "float32"),  # AVX2 only (AMD Zen 3): bf16 falls back to scalar code
])
def test_auto_picks_bf16_only_where_it_is_faster(rates, fp32, bf16, amp, dtype):
    rates(fp32, bf16)
    assert runtime.resolve_amp("auto", "cpu") == amp
    assert runtime.resolve_dtype("auto", "cpu") == dtype
    with runtime.autocast("auto", "cpu"):
        assert torch.nn.Linear(2, 2)(torch.randn(1, 2)).dtype == getattr(torch, dtype)


def test_an_explicit_setting_always_wins(rates):
    measured = rates(110.0, 0.3)
    assert runtime.resolve_amp("bf16", "cpu") == "bf16" and runtime.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert runtime.resolve_amp("none", "cpu") == "none" and runtime.resolve_dtype("float32", "cpu") == "float32"
    assert measured == []  # nothing measured when nothing is "auto"
    with pytest.raises(ValueError, match="bf61"):
        runtime.resolve_amp("bf61", "cpu")


def test_the_measurement_is_cached_per_machine(rates, tmp_path):
    measured = rates(340.0, 1900.0)
    runtime.resolve_amp("auto", "cpu")
    first = len(measured)
    assert first >= 2
    runtime.cpu_matmul_rates.cache_clear()  # a new process: reads the file, measures nothing
    assert runtime.resolve_amp("auto", "cpu") == "bf16" and len(measured) == first
    cached = json.loads((tmp_path / "cache" / "cpu-precision.json").read_text())
    (entry,) = cached.values()
    assert entry["fp32"] == 340.0 and entry["bf16"] == 1900.0 and "threads" in entry["machine"]


def test_the_cpu_preset_is_auto_and_resolves_to_a_copy(rates, capsys):
    rates(110.0, 0.3)
    cfg = cpu()
    assert (cfg.stage1.amp, cfg.stage2.amp, cfg.llm.dtype) == ("auto", "auto", "auto")
    chosen = runtime.resolve_precision(cfg, "cpu")
    assert (chosen.stage1.amp, chosen.stage2.amp, chosen.llm.dtype) == ("none", "none", "float32")
    assert cfg.stage1.amp == "auto"  # the caller's config is untouched
    out = capsys.readouterr().out
    assert "stage1.amp=none" in out and "0.3 GFLOP/s in bf16" in out and "110 GFLOP/s in fp32" in out


def test_train_records_the_choice_in_config_json(rates, tmp_path, capsys):
    rates(340.0, 1900.0)
    cfg = tiny_config(max_steps=1, amp="auto")
    run_dir = tmp_path / "run"
    train(cfg, 1, tiny_task(cfg), progress=False, run_dir=run_dir)
    saved = json.loads(next((run_dir / "checkpoints").glob("ckpt-*/config.json")).read_text())
    assert saved["stage1"]["amp"] == "bf16"
    assert "precision: auto chose stage1.amp=bf16" in capsys.readouterr().out


def test_the_real_measurement_runs_quickly_and_is_positive():
    import time

    t0 = time.perf_counter()
    fp32 = runtime._matmul_gflops(torch.float32)
    assert fp32 > 0.1 and time.perf_counter() - t0 < 5


def test_a_busy_machine_small_product_does_not_decide(monkeypatch, tmp_path):
    """With 2 threads on a busy machine a small fp32 product ran 20-50x below its rate at 1024 (measured: 7 vs 366
    GFLOP/s), and a CPU without AMX was judged faster in bf16. The best rate over the sizes decides."""
    monkeypatch.setenv("MINBLIP2_CACHE", str(tmp_path / "cache"))

    def fake(dtype, n=384, *a, **k):
        if dtype == torch.float32:
            return 7.0 if n < 1024 else 330.0  # threading overhead swamps the small product
        return 180.0  # AVX512-BF16 without AMX
    monkeypatch.setattr(runtime, "_matmul_gflops", fake)
    runtime.cpu_matmul_rates.cache_clear()
    try:
        assert runtime.resolve_amp("auto", "cpu") == "none"
        assert runtime.resolve_dtype("auto", "cpu") == "float32"
    finally:
        runtime.cpu_matmul_rates.cache_clear()
