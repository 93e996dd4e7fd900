"""DDP on CPU (gloo): 2 processes x batch 4 train the same weights as 1 process x batch 8, and resume in 1.

Why they can match at all: `batch_indices` + `local_slice` give the 2 processes the two halves of the
1-process batch; ITC gathers features WITH gradient (itc_gather_grad=True), so its loss and gradient are the
global batch's; ITG divides by the global token count (losses.itg_loss); DDP averages the gradients, so the
clip norm, AdamW and the schedule see the 1-process gradient. ITM is off (its negatives are sampled, so
they differ with the process count) and so is dropout.

Tolerance 1e-5 on every weight except the attention KEY BIASES: softmax(q.(k + b)) does not depend on b,
so their true gradient is exactly 0 and what they get is float noise -- which Adam's normalised update
blows up to ~lr * 0.1 per step, differently in each run (a permuted batch in ONE process does the same).
They change no output; the test checks that instead (same losses on a held-out batch).
"""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minblip2.stage1 import Stage1Model
from minblip2.train import latest_checkpoint, load_checkpoint, train

from ddp_worker import tiny_config, tiny_task

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
RECIPE = dict(max_steps=4, lr=5e-4, min_lr=5e-5, losses=("itc", "itg"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # as torchrun's OMP_NUM_THREADS=1 in the workers
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_process(run_dir, stop_at=None):
    cfg = tiny_config(batch_size=8, **RECIPE)
    cfg.qformer.dropout = 0.0
    train(cfg, 1, tiny_task(cfg), stop_at=stop_at, progress=False, run_dir=run_dir)
    return cfg


def losses(run_dir):
    with open(Path(run_dir) / "log.csv") as f:
        return [[float(r[k]) for k in ("loss_itc", "loss_itg", "loss", "grad_norm")] for r in csv.DictReader(f)]


def assert_close_rows(a, b):
    """Losses are logged to 6 decimals, the grad norm to 4."""
    assert a[:3] == pytest.approx(b[:3], rel=1e-5) and a[3] == pytest.approx(b[3], rel=0, abs=2e-4), (a, b)


def ckpt(run_dir):
    return latest_checkpoint(Path(run_dir) / "checkpoints")


def assert_same_model(dir_a, dir_b, cfg):
    a, b = load_file(str(ckpt(dir_a) / "model.safetensors")), load_file(str(ckpt(dir_b) / "model.safetensors"))
    assert a.keys() == b.keys()
    inert = {k for k in a if k.endswith(".key.bias")}
    assert len(inert) == 3  # self-attention in layers 0 and 1, cross-attention in layer 0 only
    for k in a.keys() - inert:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"
    # the key biases (see the docstring) differ, but change nothing: both models score a fresh batch the same
    task = tiny_task(cfg)
    out = []
    for d in (dir_a, dir_b):
        model = Stage1Model(cfg.qformer, cfg.stage1).eval()
        load_checkpoint(ckpt(d), model)
        with torch.no_grad():
            out.append(task.loss(model, torch.arange(60, 76), torch.device("cpu")))
    for k in out[0]:
        assert torch.allclose(out[0][k], out[1][k], rtol=1e-6, atol=0), (k, out[0][k], out[1][k])


def test_ddp_two_processes_equal_one_process_then_resume_in_one(tmp_path):
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # a script's sys.path starts at tests/, not here: without this the worker imports the INSTALLED minblip2,
    # which in another checkout (a git worktree) is not the code under test
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    torchrun = Path(os.sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(TESTS / "ddp_worker.py"), str(ddp_dir),
           "--batch_size=4", "--stop_at=3", "--qformer.dropout=0.0", *(f"--{k}={v!r}" for k, v in RECIPE.items())]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert ckpt(ddp_dir).name == "ckpt-0000003"
    assert not (ddp_dir / "checkpoints" / "ckpt-0000004").exists()

    cfg = one_process(one_dir, stop_at=3)
    # logged losses are the all-reduced means over the 2 processes: the 1-process values
    for a, b in zip(losses(ddp_dir), losses(one_dir), strict=True):
        assert_close_rows(a, b)
    assert_same_model(ddp_dir, one_dir, cfg)

    # the 2-process checkpoint resumes in 1 process (batch 8: the same global batch) for the last step
    shutil.copytree(ddp_dir, tmp_path / "ddp_before")
    one_process(ddp_dir)
    one_process(one_dir)
    assert ckpt(ddp_dir).name == ckpt(one_dir).name == "ckpt-0000004"
    assert len(losses(ddp_dir)) == 4
    assert losses(ddp_dir)[:3] == losses(tmp_path / "ddp_before")  # the 2-process rows are kept
    assert_close_rows(losses(ddp_dir)[3], losses(one_dir)[3])
    assert_same_model(ddp_dir, one_dir, cfg)


def test_progress_bar_is_silent_when_asked():
    """Bars go to stderr; lessons (nbval) and non-master ranks must print none, and TQDM_DISABLE=1 must win
    (tqdm reads it at import, hence fresh processes)."""
    code = ("from minblip2.dist import progress_bar\n"
            "assert list(progress_bar(range(3), show=False)) == [0, 1, 2]\n"
            "assert list(progress_bar(range(3), desc='bar')) == [0, 1, 2]\n")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert shown.stderr.count("bar:") >= 1  # the second bar shows when nothing silences it
    silenced = subprocess.run([sys.executable, "-c", code], env={**env, "TQDM_DISABLE": "1"},
                              capture_output=True, text=True, check=True)
    assert silenced.stderr == ""
