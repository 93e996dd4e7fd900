"""scripts/gpu_check.py, what a user with a GPU runs first: here its tiny CPU mode end to end, and its no-GPU exit."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"


def run(*args, **env):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_tiny_mode_runs_every_check_and_writes_json(tmp_path):
    """The same runs as on a GPU (stage 1 with features computed and cached, gpu24's checkpointing, stage 2,
    beam search) at tiny shapes: no hub, no weight wheels, no dataset; the table and the JSON agree."""
    out = tmp_path / "check.json"
    p = run("--tiny", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"stage 1, features computed each step", "stage 1, cached features",
                         "stage 1, gpu24 (checkpointing)", "stage 2, tiny OPT"}
    assert runs["stage 1, gpu24 (checkpointing)"]["checkpointing"] and runs["stage 1, cached features"]["features"] == "cached"
    for r in runs.values():
        assert len(r["step_s_all"]) == report["steps"] == 3 and r["step_s_median"] > 0 and r["samples_per_s"] > 0
        assert 0.5 < r["estimate_over_peak"] < 2, r  # the CPU profiler's peak vs the dry run's estimate
    assert report["beam_search"]["beams"] == 5 and report["beam_search"]["seconds"] > 0
    assert "| stage 2, tiny OPT | 8 x 1 |" in p.stdout and "beam search" in p.stdout
    # the data path (bench/data_path.py): the training loop's rate over the rate on pre-staged batches
    assert set(report["data_path"]) == {"cached", "computed"}
    assert all(r["median"] > 0 and r["q1"] <= r["median"] <= r["q3"] for r in report["data_path"].values())
    assert "data path, cached features" in p.stdout
    # issue 27's paths: a device checkpoint loads with weights_only; the dropout-free pass runs checkpointed and not
    # (at tiny shapes the recomputation's temporaries outweigh the activations: the saving shows at gpu24's shapes)
    s = report["scaleout"]
    assert s["checkpoint_rng_restored"] is True
    assert s["dropout_free_pass_peak_bytes_checkpointing_on"] > 0
    assert s["dropout_free_pass_peak_bytes_checkpointing_off"] > 0


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    p = run("--out", str(tmp_path / "none.json"), CUDA_VISIBLE_DEVICES="")
    assert p.returncode == 0 and "no CUDA GPU" in p.stdout and "--tiny" in p.stdout
    assert not (tmp_path / "none.json").exists()
