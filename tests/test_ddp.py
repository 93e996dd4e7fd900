"""DDP on CPU (gloo): 2 processes x batch 4 train the same weights as 1 process x batch 8 (ITC + ITM + ITG),
resume in 1, resume exactly in 2, and hand every collective tensors on the run's device; no barrier per step.

Why they can match at all: `batch_indices` + `local_slice` give the 2 processes the two halves of the
1-process batch; ITC gathers features WITH gradient (itc_gather_grad=True), so its loss and gradient are the
global batch's; ITM's hard negatives are drawn for the whole global batch in every process from a generator
seeded by the step alone (losses.sample_hard_negatives, train.step_generator), so they are the 1-process
negatives, and the negative texts/images come from the other process when they live there (stage1's
`_gather_padded`, gathered image tokens); ITG divides by the global token count (losses.itg_loss); DDP averages
the gradients, so the clip norm, AdamW and the schedule see the 1-process gradient. Dropout is off (each
process draws its own masks).

Tolerance 1e-5 on every weight except the attention KEY BIASES: softmax(q.(k + b)) does not depend on b,
so their true gradient is exactly 0 and what they get is float noise -- which Adam's normalised update
blows up to ~lr * 0.1 per step, differently in each run (a permuted batch in ONE process does the same).
They change no output; the test checks that instead (same losses on a held-out batch).
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minblip2.stage1 import Stage1Model
from minblip2.train import train
from minblip2.checkpoint import latest_checkpoint, load_checkpoint

from ddp_worker import tiny_config, tiny_task, torchrun

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
RECIPE = dict(max_steps=4, lr=5e-4, min_lr=5e-5, losses=("itc", "itm", "itg"))
COLUMNS = ("loss_itc", "loss_itm", "loss_itg", "loss", "grad_norm")


pytestmark = pytest.mark.usefixtures("one_thread")  # as torchrun's OMP_NUM_THREADS=1 in the workers


def one_process(run_dir, stop_at=None):
    cfg = tiny_config(batch_size=8, **RECIPE)
    cfg.qformer.dropout = 0.0
    train(cfg, 1, tiny_task(cfg), stop_at=stop_at, progress=False, run_dir=run_dir)
    return cfg


def losses(run_dir):
    with open(Path(run_dir) / "log.csv") as f:
        return [[float(r[k]) for k in COLUMNS] for r in csv.DictReader(f)]


def assert_close_rows(a, b):
    """Losses are logged to 6 decimals, the grad norm to 4."""
    assert a[:-1] == pytest.approx(b[:-1], rel=1e-5) and a[-1] == pytest.approx(b[-1], rel=0, abs=2e-4), (a, b)


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
            out.append(task.loss(model, torch.arange(60, 76), torch.device("cpu"),  # the same ITM negatives
                                 generator=torch.Generator().manual_seed(0)))
    for k in out[0]:
        assert torch.allclose(out[0][k], out[1][k], rtol=1e-6, atol=0), (k, out[0][k], out[1][k])


def test_ddp_two_processes_equal_one_process_then_resume_in_one(tmp_path):
    """ITC + ITM + ITG in 2 processes == 1 process; meanwhile every tensor handed to a collective is checked
    (ddp_worker.DeviceChecks: on the run's device, and not made by a factory call without device=)."""
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    torchrun("ddp_worker.py", ddp_dir, "--batch_size=4", "--stop_at=3", "--qformer.dropout=0.0",
             "--check_devices=True",
             *(f"--{k}={v!r}" for k, v in RECIPE.items()))
    for rank in (0, 1):  # the checks saw the collectives of a step: the logged losses, ITC, ITM, ITG, RNG state
        calls = json.loads((ddp_dir / f"collectives-rank{rank}.json").read_text())
        assert calls["all_reduce"] >= 3 * 3 and calls["all_gather"] >= 3 * 5, calls
        # issue 27, item 7: no barrier per step (one after each: 3 here), only a fixed few (start, end)
        assert calls.get("barrier", 0) <= 2, calls
        assert calls["all_to_all_single"] == 3, calls  # issue 27, item 5: below
    # ITM's negative images travel as the B = 4 rows of 9 x 24 fp32 tokens each process needs (3 steps; what is
    # received is what the other process sent: send + receive buffers, summed over both), not as all W * B rows
    # with gradient (an all_gather, and an all_reduce in backward)
    moved = [json.loads((ddp_dir / f"collective-bytes-rank{r}.json").read_text())["all_to_all_single"] for r in (0, 1)]
    assert sum(moved) == 2 * (3 * 2 * 4 * 9 * 24 * 4), moved
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


def test_ddp_resume_is_exact_in_every_process(tmp_path):
    """Dropout on: each process draws its own masks from its own RNG (seeded seed + rank). A 2-process run stopped
    after its step-2 checkpoint (as a crash would leave it) and resumed in 2 processes equals the uninterrupted
    run bit for bit: the checkpoint keeps EVERY process's RNG state. (It kept rank 0's, which every process then
    restored: after a resume all of them drew the same dropout masks.)"""
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    args = ["--batch_size=4", "--max_steps=4", "--ckpt_every=2", "--qformer.dropout=0.1", "--lr=5e-4"]
    torchrun("ddp_worker.py", ref, *args)  # 4 steps; keeps ckpt-2 and ckpt-4
    shutil.copytree(ref, resumed)
    (resumed / "checkpoints" / "latest").write_text("ckpt-0000002")  # killed after step 2 was checkpointed
    shutil.rmtree(resumed / "checkpoints" / "ckpt-0000004")
    rng = torch.load(ckpt(resumed) / "state.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # one state per process
    torchrun("ddp_worker.py", resumed, *args)
    assert ckpt(resumed).name == "ckpt-0000004"

    def rows(run_dir):
        with open(run_dir / "log.csv") as f:
            return [{k: v for k, v in r.items() if k != "time"} for r in csv.DictReader(f)]
    assert len(rows(ref)) == 4 and rows(resumed) == rows(ref)
    a, b = (load_file(str(ckpt(d) / "model.safetensors")) for d in (ref, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_refuse_to_resume_from_different_checkpoints(tmp_path):
    """Issue 27, item 2: each process resumed from the latest checkpoint IT saw. On nodes without a shared
    filesystem, process 1's copy of the run may lack the newest checkpoint: it resumed a step earlier than process
    0, the two ran different numbers of steps, and the job hung in a collective. Now rank 0's choice holds and both
    processes stop at once with an error naming what each holds; with equal copies they resume."""
    args = ["--batch_size=4", "--max_steps=4", "--ckpt_every=1", "--qformer.dropout=0.0"]
    torchrun("ddp_worker.py", tmp_path / "shared", *args, "--stop_at=3")  # ckpt-2 and ckpt-3 kept
    for node in (0, 1):
        shutil.copytree(tmp_path / "shared", tmp_path / "run" / f"node{node}")
    node1 = tmp_path / "run" / "node1" / "checkpoints"  # process 1's disk never got the newest checkpoint
    shutil.rmtree(node1 / "ckpt-0000003")
    (node1 / "latest").write_text("ckpt-0000002")
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
           str(TESTS / "ddp_worker.py"), str(tmp_path / "run"), *args, "--node_dirs=True"]
    from ddp_worker import subprocess_env
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "process 0: ckpt-0000003, process 1: ckpt-0000002" in p.stderr and "Nothing was trained" in p.stderr
    assert ckpt(tmp_path / "run" / "node0").name == "ckpt-0000003"  # and nothing was written

    shutil.copytree(tmp_path / "run" / "node0" / "checkpoints", node1, dirs_exist_ok=True)  # the documented fix
    out = torchrun("ddp_worker.py", tmp_path / "run", *args, "--node_dirs=True")
    assert "some processes do not see" in out.stdout  # process 1's run directory is not process 0's
    assert ckpt(tmp_path / "run" / "node0").name == "ckpt-0000004"


def test_ddp_does_not_broadcast_the_frozen_llm(tmp_path):
    """Issue 27, item 6: DDP wrapped the whole stage-2 model, so at start it broadcast the frozen LLM (OPT-2.7B:
    5.4 GB to every process) and its buffers before every forward. Now DDP holds the trainable weights only: 2
    stage-2 steps in 2 processes broadcast those, plus the one frozen tensor that process 1 had changed (found by
    a checksum), and the LLMs end equal."""
    torchrun("ddp_worker.py", "stage2", tmp_path)
    got = [json.loads((tmp_path / f"broadcast-rank{r}.json").read_text()) for r in (0, 1)]
    for g in got:
        assert g["llm_bytes"] > 2 * g["trainable_bytes"]  # the frozen LLM is most of the model
        # the trainable weights and the changed LayerNorm, plus the few bytes of train()'s broadcast_object calls
        assert g["trainable_bytes"] + g["layer_norm_bytes"] <= g["broadcast_bytes"] < \
            g["trainable_bytes"] + g["layer_norm_bytes"] + 4096, g
    assert got[0]["llm_checksum"] == got[1]["llm_checksum"]


def test_progress_bar_is_silent_when_asked():
    """Bars go to stderr; lessons (nbval) and non-master ranks must print none, and TQDM_DISABLE=1 must win
    (tqdm reads it at import, hence fresh processes)."""
    code = ("from minblip2.runtime import progress_bar\n"
            "assert list(progress_bar(range(3), show=False)) == [0, 1, 2]\n"
            "assert list(progress_bar(range(3), desc='bar')) == [0, 1, 2]\n")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert shown.stderr.count("bar:") >= 1  # the second bar shows when nothing silences it
    silenced = subprocess.run([sys.executable, "-c", code], env={**env, "TQDM_DISABLE": "1"},
                              capture_output=True, text=True, check=True)
    assert silenced.stderr == ""
