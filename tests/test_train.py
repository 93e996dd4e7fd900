"""The training loop on a tiny random stage-1 model and synthetic features: exact resume (also after SIGKILL),
atomic checkpoints, seeds, the NaN guard, the schedule and data order, retrieval metrics, the baselines.

The tiny task (tests/ddp_worker.py): 40 "images" of 9 tokens x 24 dims, 80 captions, a 2-layer 32-wide
Q-Former with 4 queries over the offline BERT tokenizer (vocab 30523). A step takes ~0.1 s on one thread.
"""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from minblip2 import dist, runtime
from minblip2.tools.baselines import LinearProjectionModel, nearest_neighbour_captions, train_linear_probe
from minblip2.config import QFormerConfig, TrainConfig
from minblip2.retrieval import recall_at_k, retrieval_scores
from minblip2.stage1 import Stage1Model
from minblip2.tasks import batch_indices, local_slice
from minblip2.train import lr_at, train
from minblip2.checkpoint import latest_checkpoint, load_checkpoint

from ddp_worker import subprocess_env, tiny_config, tiny_task

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def run(run_dir, stop_at=None, resume=True, task=None, **recipe):
    cfg = tiny_config(**recipe)
    train(cfg, 1, task or tiny_task(cfg), resume=resume, stop_at=stop_at, progress=False, run_dir=run_dir)
    return Path(run_dir)


def log(run_dir) -> list[dict]:
    """log.csv without the wall-clock column, as the exact strings written."""
    with open(Path(run_dir) / "log.csv") as f:
        return [{k: v for k, v in r.items() if k != "time"} for r in csv.DictReader(f)]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(Path(run_dir) / "checkpoints") / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max():.3g}"


def ckpt_steps(run_dir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (Path(run_dir) / "checkpoints").glob("ckpt-*"))


# ----------------------------------------------------------------------------- 1. exact resume


def test_resume_is_exact(tmp_path):
    """8 steps straight == 5 steps, stop, resume to 8 == (from the step-4 checkpoint) resume to 8: same log
    values and bit-identical weights. Dropout (0.1) and ITM negative sampling draw from the RNG, whose state
    the checkpoint carries; the data order is a function of the step."""
    ref = run(tmp_path / "ref", max_steps=8, ckpt_every=2)
    assert [r["step"] for r in log(ref)] == [str(s) for s in range(1, 9)]
    assert len({r["loss_itm"] for r in log(ref)}) > 1  # all three losses are on

    a = run(tmp_path / "a", stop_at=5, max_steps=8, ckpt_every=2)
    assert ckpt_steps(a) == [4, 5]  # ckpt-2 rotated out (keep=2); stop_at also saves its step
    assert len(log(a)) == 5
    b = tmp_path / "b"
    shutil.copytree(a, b)

    run(a, max_steps=8, ckpt_every=2)  # resumes from step 5
    assert log(a) == log(ref)
    assert_same_weights(weights(a), weights(ref))

    # the interrupted-mid-way case: only step 4 is checkpointed, yet the log already holds step 5
    (b / "checkpoints" / "latest").write_text("ckpt-0000004")
    shutil.rmtree(b / "checkpoints" / "ckpt-0000005")
    run(b, max_steps=8, ckpt_every=2)
    assert log(b) == log(ref)  # row 5 replaced, not duplicated
    assert_same_weights(weights(b), weights(ref))


# ----------------------------------------------------------------------------- 2. checkpoint files


def test_half_written_or_foreign_checkpoints_are_never_used(tmp_path):
    src = run(tmp_path / "src", max_steps=2, ckpt_every=1)
    root = tmp_path / "ckpts"
    root.mkdir()
    assert latest_checkpoint(root) is None

    # a crash mid-save leaves a .tmp-ckpt-* directory and no `latest`: nothing to resume from
    shutil.copytree(src / "checkpoints" / "ckpt-0000002", root / ".tmp-ckpt-0000002-4242")
    assert latest_checkpoint(root) is None
    # a complete-looking ckpt dir that `latest` does not name is ignored too (it was renamed into place,
    # but the crash came before `latest` moved)
    shutil.copytree(src / "checkpoints" / "ckpt-0000001", root / "ckpt-0000001")
    shutil.copytree(src / "checkpoints" / "ckpt-0000002", root / "ckpt-0000002")
    assert latest_checkpoint(root) is None
    (root / "latest").write_text("ckpt-0000001\n")
    assert latest_checkpoint(root) == root / "ckpt-0000001"
    (root / "latest").write_text("ckpt-0000003")  # names a directory that is not there
    assert latest_checkpoint(root) is None

    cfg = tiny_config()
    model = tiny_task(cfg).model
    assert load_checkpoint(root / "ckpt-0000002", model) == 2  # the intact one loads
    # optimizer state for other parameter groups (another config's lr groups, or older code): the file and the way out
    with pytest.raises(ValueError, match="other parameter groups") as e:
        load_checkpoint(root / "ckpt-0000002", model, torch.optim.AdamW(model.parameters()))
    assert "config.json" in str(e.value) and f"delete {root.parent} to train" in str(e.value)  # the run directory

    # truncated weights / state: a ValueError naming the path and the way out, not a stack of safetensors
    for name in ("model.safetensors", "state.pt"):
        bad = root / f"bad-{name}"
        shutil.copytree(root / "ckpt-0000002", bad)
        with open(bad / name, "r+b") as f:
            f.truncate(os.path.getsize(bad / name) // 2)
        with pytest.raises(ValueError, match="unreadable") as e:
            load_checkpoint(bad, model, torch.optim.AdamW(model.parameters()))
        assert str(bad) in str(e.value) and "latest" in str(e.value) and "delete it" in str(e.value)

    # another config: every shape mismatch is listed
    other = tiny_config()
    other.qformer.num_queries = 6
    with pytest.raises(ValueError, match="another config") as e:
        load_checkpoint(root / "ckpt-0000002", Stage1Model(other.qformer, other.stage1))
    assert "qformer.query_tokens: checkpoint (1, 4, 32) vs model (1, 6, 32)" in str(e.value)
    other = tiny_config()
    other.qformer.hidden_size, other.qformer.intermediate_size = 48, 96
    with pytest.raises(ValueError, match=r"lm_head.dense.weight: checkpoint \(32, 32\) vs model \(48, 48\)") as e:
        load_checkpoint(root / "ckpt-0000002", Stage1Model(other.qformer, other.stage1))
    assert str(e.value).count(" vs model ") == 8 and str(e.value).endswith("...")  # the first 8 of many
    # ... and train() refuses to resume such a run instead of silently starting over
    with pytest.raises(ValueError, match="vs model"):
        train(other, 1, tiny_task(other), stop_at=3, progress=False, run_dir=src)


class _RunsCode:
    """What a malicious state.pt holds: unpickling it calls os.system (here: creates a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_state_pt_is_refused_and_runs_no_code(tmp_path):
    """Issue 27, item 13: resuming read state.pt with weights_only=False, so a shared run directory could run code
    on --resume. Now state.pt holds tensors and plain values only (numpy's and Python's random states included),
    loads with weights_only=True, and a pickle that needs more is refused with an error saying why and what to do."""
    src = run(tmp_path / "src", max_steps=1, ckpt_every=1)
    ckpt = latest_checkpoint(src / "checkpoints")
    torch.load(ckpt / "state.pt", weights_only=True)  # today's checkpoints are plain
    model = tiny_task(tiny_config()).model
    marker = tmp_path / "code-ran"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["data_state"] = _RunsCode(marker)
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(ValueError, match="refusing to load state.pt") as e:
        load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists(), "unpickling state.pt ran code"
    assert "could run arbitrary code" in str(e.value) and "--upgrade" in str(e.value)
    with pytest.raises(ValueError, match="refusing"):  # train(--resume) goes through the same door
        run(src, max_steps=2, ckpt_every=1)
    assert not marker.exists()


def test_rng_states_round_trip_and_old_checkpoints_upgrade(tmp_path):
    """numpy's and Python's random states come back exactly from a weights_only checkpoint; a state.pt of an older
    minblip2 (numpy arrays and tuples in it) is refused, then loads after `python -m minblip2.checkpoint --upgrade`."""
    import random

    import numpy as np

    from minblip2.checkpoint import main as checkpoint_main, rng_state, save_checkpoint

    cfg = tiny_config()
    model = tiny_task(cfg).model
    opt = torch.optim.AdamW(model.parameters())
    np.random.seed(3), random.seed(3), random.gauss(0, 1)  # a cached gaussian in Python's state too
    path = save_checkpoint(tmp_path / "c", 5, model, opt, None, cfg)
    expected = (np.random.rand(3).tolist(), random.random(), random.gauss(0, 1), torch.rand(2).tolist())
    np.random.seed(99), random.seed(99), torch.manual_seed(99)
    assert load_checkpoint(path, model, opt) == 5
    assert (np.random.rand(3).tolist(), random.random(), random.gauss(0, 1), torch.rand(2).tolist()) == expected

    old = torch.load(path / "state.pt", weights_only=True)  # as an older minblip2 wrote it
    old["rng"] = [{**rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}]
    torch.save(old, path / "state.pt")
    with pytest.raises(ValueError, match="refusing"):
        load_checkpoint(path, model, opt)
    checkpoint_main(["--upgrade", str(path)])
    assert load_checkpoint(path, model, opt) == 5


# ----------------------------------------------------------------------------- 3. SIGKILL mid-run


def test_resume_after_sigkill(tmp_path):
    """Kill -9 a training process once it has written >= 3 checkpoints (one per step, so the kill lands
    anywhere: mid-step, mid-save, mid-log); resuming then reproduces an uninterrupted run bit for bit."""
    run_dir = tmp_path / "killed"
    recipe = dict(max_steps=30, ckpt_every=1, log_every=10)
    args = [f"--{k}={v}" for k, v in recipe.items()]
    env = subprocess_env()
    errors = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, str(TESTS / "ddp_worker.py"), str(run_dir), "--threads=1", *args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    latest, deadline = run_dir / "checkpoints" / "latest", time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.exists() and int(latest.read_text().split("-")[1]) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {open(errors.name).read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        errors.close()
    assert proc.returncode == -signal.SIGKILL
    last = int(latest_checkpoint(run_dir / "checkpoints").name.split("-")[1])
    assert 3 <= last < 30

    stop = last + 3  # a few steps past the checkpoint: they are recomputed, not read from the killed run
    run(run_dir, stop_at=stop, **recipe)
    ref = run(tmp_path / "ref", stop_at=stop, **recipe)
    assert [r["step"] for r in log(run_dir)] == [str(s) for s in range(1, stop + 1)]
    assert log(run_dir) == log(ref)  # rows <= last come from the killed process, the rest from the resume
    assert_same_weights(weights(run_dir), weights(ref))


# ----------------------------------------------------------------------------- 4. seeds


def test_same_seed_same_run_different_seed_different_run(tmp_path):
    a = run(tmp_path / "a", max_steps=3, ckpt_every=3, seed=7)
    b = run(tmp_path / "b", max_steps=3, ckpt_every=3, seed=7)
    # same initial weights, another recipe seed: the data order, dropout and ITM negatives alone make it differ
    cfg = tiny_config(max_steps=3, ckpt_every=3, seed=8)
    c = run(tmp_path / "c", task=tiny_task(cfg, model_seed=7), max_steps=3, ckpt_every=3, seed=8)
    assert log(a) == log(b)
    assert_same_weights(weights(a), weights(b))
    assert all(ra["loss"] != rc["loss"] for ra, rc in zip(log(a), log(c)))
    wa, wc = weights(a), weights(c)
    assert not any(torch.equal(wa[k], wc[k]) for k in wa if wa[k].numel() > 1)


# ----------------------------------------------------------------------------- 5. NaN guard


@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nan_guard_stops_before_writing_the_bad_step(tmp_path, where, amp):
    """fp32 and bf16 have no loss scaler: the first non-finite loss or gradient stops the run."""
    cfg = tiny_config(max_steps=8, ckpt_every=1, amp=amp)
    task = tiny_task(cfg)
    calls = {"n": 0}
    if where == "loss":
        good_loss = task.loss

        def loss(model, idx, device, **kw):
            calls["n"] += 1
            out = good_loss(model, idx, device, **kw)
            return {**out, "loss": out["loss"] * (float("nan") if calls["n"] == 3 else 1.0)}
        task.loss = loss
    else:  # a finite loss whose gradient overflows

        def hook(g):
            calls["n"] += 1
            return torch.full_like(g, float("inf")) if calls["n"] == 3 else g
        task.model.text_proj.weight.register_hook(hook)
    with pytest.raises(FloatingPointError, match=r"stage 1, step 3: non-finite") as e:
        train(cfg, 1, task, progress=False, run_dir=tmp_path)
    assert ("loss=nan" if where == "loss" else "grad_norm=inf") in str(e.value)
    assert "ckpt-0000002" in str(e.value)  # names the last good checkpoint
    assert ckpt_steps(tmp_path) == [1, 2]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "ckpt-0000002"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [r["step"] for r in log(tmp_path)] == ["1", "2"]
    assert torch.isfinite(weights(tmp_path)["text_proj.weight"]).all()


def overflow_at(task, steps):
    """Make the loss inf at the given steps (1-based), as an fp16 overflow in the forward pass does."""
    good_loss, calls = task.loss, {"n": 0}

    def loss(model, idx, device, **kw):
        calls["n"] += 1
        out = good_loss(model, idx, device, **kw)
        return {**out, "loss": out["loss"] * (float("inf") if calls["n"] in steps else 1.0)}
    task.loss = loss


def test_fp16_overflow_is_skipped_and_training_goes_on(tmp_path):
    """fp16 + GradScaler: an overflow (here an inf loss at step 6) makes the scaler skip that step and halve its
    scale -- its job -- instead of ending the run; the log says which steps were skipped. Steps 1-3 are the
    scaler's own calibration: its first scale, 2^16, overflows this model's gradients until it has halved 3 times."""
    cfg = tiny_config(max_steps=8, ckpt_every=4, amp="fp16")
    task = tiny_task(cfg)
    overflow_at(task, {6})
    train(cfg, 1, task, progress=False, run_dir=tmp_path)
    rows = log(tmp_path)
    assert [r["skipped"] for r in rows] == ["1", "1", "1", "0", "0", "1", "0", "0"]
    scale = [float(r["loss_scale"]) for r in rows]
    assert scale[0] == 2.0 ** 16 and scale[6] == scale[5] / 2  # halved after each overflow
    assert rows[5]["loss"] == "inf" and all(float(r["loss"]) < 20 for i, r in enumerate(rows) if i != 5)
    state = torch.load(latest_checkpoint(tmp_path / "checkpoints") / "state.pt", weights_only=True)
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {4.0}  # 8 steps, 4 skipped
    assert state["scaler"]["scale"] == scale[7]
    assert all(torch.isfinite(w).all() for w in weights(tmp_path).values())


def test_fp16_stops_when_overflows_persist(tmp_path):
    cfg = tiny_config(max_steps=10, ckpt_every=2, amp="fp16", max_overflow_steps=4)
    task = tiny_task(cfg)
    overflow_at(task, set(range(5, 100)))
    with pytest.raises(FloatingPointError, match=r"step 8: non-finite .* skipped 4 steps in a row") as e:
        train(cfg, 1, task, progress=False, run_dir=tmp_path)
    assert "ckpt-0000006" in str(e.value)  # skipped steps change nothing: ckpt-6 is a good one
    assert [r["skipped"] for r in log(tmp_path)] == ["1", "1", "1", "0", "1", "1", "1"]  # no row for step 8


def test_compile_is_refused_on_cpu(tmp_path):
    """torch.compile's stage-1 step crashes in backward on the CPU stack (torch 2.14, inductor); on a GPU it is
    1.47x faster. On CPU train() refuses it at once, with the reason, before building anything."""
    cfg = tiny_config(compile=True)
    with pytest.raises(ValueError, match="compile=True needs a CUDA GPU"):
        train(cfg, 1, task=None, progress=False, run_dir=tmp_path)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_a_model_built_with_another_loss_is_refused(tmp_path):
    """Stage1Model reads its losses from the Stage1Config it was built with: training it under a config that names
    another loss would train one thing and record another. train() refuses, naming the field; the same recipe with
    other step counts or learning rates is fine."""
    cfg = tiny_config(query_sim_weight=1.0)
    task = tiny_task(tiny_config())  # built with the paper's losses (query_sim_weight 0)
    with pytest.raises(ValueError, match=r"query_sim_weight: model 0.0, cfg 1.0"):
        train(cfg, 1, task, progress=False, run_dir=tmp_path)
    assert not tmp_path.joinpath("checkpoints").exists()
    task.model.scfg = cfg.stage1  # the fix the message names
    train(tiny_config(query_sim_weight=1.0, max_steps=2), 1, task, progress=False, run_dir=tmp_path / "ok")
    assert "loss_qsim" in log(tmp_path / "ok")[0]


# ----------------------------------------------------------------------------- 6. schedule and data order


def test_lr_schedule():
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    warm = [lr_at(s, t) for s in range(10)]
    assert warm[0] == pytest.approx(1e-4) and warm[0] < 0.11 * t.lr  # starts near 0 (lr / warmup_steps)
    assert all(b - a == pytest.approx(1e-4) for a, b in zip(warm, warm[1:]))  # linear
    assert warm[-1] == pytest.approx(t.lr) and lr_at(10, t) == pytest.approx(t.lr)  # the peak
    decay = [lr_at(s, t) for s in range(10, 111)]
    assert all(b < a for a, b in zip(decay, decay[1:]))  # cosine: strictly down
    assert lr_at(60, t) == pytest.approx((t.lr + t.min_lr) / 2)  # half-way is the mean
    assert lr_at(110, t) == pytest.approx(t.min_lr) and lr_at(500, t) == pytest.approx(t.min_lr)
    assert max(lr_at(s, t) for s in range(200)) == pytest.approx(t.lr)


def test_autocast_follows_the_amp_setting_and_rejects_typos():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with runtime.autocast("bf16", "cpu"):
        assert lin(x).dtype == torch.bfloat16
    with runtime.autocast("none", torch.device("cpu")):
        assert lin(x).dtype == torch.float32
    with pytest.raises(ValueError, match="bf61"):
        runtime.autocast("bf61", "cpu")


def test_batch_indices_epochs_purity_and_ranks(monkeypatch):
    n, gb = 83, 8  # 10 full batches per epoch; the last 3 samples of each epoch's order are dropped
    for epoch in range(2):
        seen = torch.cat([batch_indices(epoch * 10 + i, n, gb, seed=5) for i in range(10)])
        assert len(seen) == 80 and len(set(seen.tolist())) == 80 and seen.max() < n
    e0 = torch.cat([batch_indices(i, n, gb, seed=5) for i in range(10)])
    e1 = torch.cat([batch_indices(10 + i, n, gb, seed=5) for i in range(10)])
    assert not torch.equal(e0, e1)  # each epoch reshuffles

    torch.manual_seed(0)
    a = batch_indices(13, n, gb, seed=5)
    torch.manual_seed(1)
    torch.rand(100)  # the global RNG is irrelevant
    assert torch.equal(a, batch_indices(13, n, gb, seed=5))
    assert not torch.equal(a, batch_indices(13, n, gb, seed=6))
    with pytest.raises(ValueError, match="larger than the dataset"):
        batch_indices(0, 5, 8, seed=0)

    # 2 fake ranks: their slices, in rank order, are the global batch
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    parts = []
    for r in range(2):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        parts.append(local_slice(a))
    assert [len(p) for p in parts] == [4, 4]
    assert torch.equal(torch.cat(parts), a)


# ----------------------------------------------------------------------------- 7. retrieval


def test_recall_at_k_hand_made():
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])  # 3 images, 2 captions each
    i2t = torch.tensor([[5., 1, 6, 0, 0, 0],   # image 0: caption 2 (wrong) first, caption 0 second -> rank 1
                        [0., 0, 1, 9, 0, 0],   # image 1: caption 3 first -> rank 0
                        [9., 0, 8, 0, 1, 7]])  # image 2: 0, 2, then caption 5 -> rank 2
    t2i = torch.tensor([[9., 0, 0],   # caption 0 (image 0): rank 0
                        [0., 1, 2],   # caption 1 (image 0): rank 2
                        [3., 2, 0],   # caption 2 (image 1): rank 1
                        [0., 5, 1],   # caption 3 (image 1): rank 0
                        [0., 1, 4],   # caption 4 (image 2): rank 0
                        [0., 8, 3]])  # caption 5 (image 2): rank 1
    r = recall_at_k(i2t, t2i, text_to_image, ks=(1, 2, 3))
    assert r == {"TR@1": 33.33, "TR@2": 66.67, "TR@3": 100.0, "IR@1": 50.0, "IR@2": 83.33, "IR@3": 100.0}


class FakeRetrievalModel(nn.Module):
    """ITC features read straight off the inputs; the ITM 'match' logit is -(image row + 10 * text id), so ITM
    prefers low indices -- the opposite of the ITC order built below."""

    def encode_image(self, e):  # (B, 1, 5): components 0..3 are the ITC feature, component 4 the image's row
        return e[..., :4], None

    def encode_text(self, ids, mask):  # text t -> one-hot e_t, so ITC(i, t) = component t of image i
        return torch.eye(4)[ids[:, 1]]

    def itm_logits(self, image_embeds, ids, mask):
        score = -(image_embeds[:, 0, 4] + 10 * ids[:, 1].float())
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_retrieval_rerank_only_reorders_the_top_k():
    # ITC(i, t) = (t + 1) * (i + 1) / 20: every image prefers text 3, then 2, 1, 0; every text image 2, then 1, 0
    Ni, Nt, k = 3, 4, 2
    img = torch.zeros(Ni, 1, 5)
    for i in range(Ni):
        img[i, 0, :4] = torch.arange(1, 5) * (i + 1) / 20
        img[i, 0, 4] = i
    ids = torch.tensor([[101, t, 102] for t in range(Nt)])
    mask = torch.ones_like(ids)
    model = FakeRetrievalModel()
    i2t, t2i, itc = retrieval_scores(model, img, ids, mask, k=0)
    assert torch.equal(i2t, itc) and torch.equal(t2i, itc.t())
    i2t, t2i, itc = retrieval_scores(model, img, ids, mask, k=k)
    for i in range(Ni):
        assert itc[i].argsort(descending=True).tolist() == [3, 2, 1, 0]
        # the ITC top-2 {3, 2} stay on top, re-ordered by ITM (text 2 now beats 3); 1, 0 keep their ITC order
        assert i2t[i].argsort(descending=True).tolist() == [2, 3, 1, 0]
        # re-ranked score = ITM match logit + ITC similarity (+ one constant per row that lifts them above the rest)
        lift = i2t[i, 3].item() - (-(i + 30) + itc[i, 3].item())
        assert i2t[i, 2].item() == pytest.approx(-(i + 20) + itc[i, 2].item() + lift, abs=1e-5)
        assert lift >= 0 and torch.equal(i2t[i, :2], itc[i, :2])  # the others keep their ITC similarity
    for t in range(Nt):  # text -> images: ITC's top-2 are images 2, 1; ITM swaps them; image 0 stays last
        assert itc[:, t].argsort(descending=True).tolist() == [2, 1, 0]
        assert t2i[t].argsort(descending=True).tolist() == [1, 2, 0]


def test_presets_rerank_more_than_the_largest_reported_k():
    """Re-ranking only the ITC top 10 cannot move anything into or out of the top 10: R@10 would equal ITC's by
    construction. LAVIS re-ranks the top 128. The cpu preset ranks by ITC alone (0): on coco-mini's val split every
    re-rank depth from 4 to 32 lowered R@1 (README, results/recipe-sweep.json)."""
    from minblip2.config import cpu, paper

    assert cpu().eval.itm_rerank_k == 0 and paper().eval.itm_rerank_k == 128


def test_retrieval_with_a_real_tiny_model():
    cfg = tiny_config()
    model = tiny_task(cfg).model
    g = torch.Generator().manual_seed(0)
    img = torch.randn(5, 9, 24, generator=g)
    ids = torch.randint(1000, 2000, (7, 6), generator=g)
    ids[:, 0], mask = 101, torch.ones(7, 6, dtype=torch.long)
    i2t, t2i, itc = retrieval_scores(model, img, ids, mask, k=3, batch_size=4)
    assert i2t.shape == (5, 7) and t2i.shape == (7, 5) and itc.shape == (5, 7)
    for scores, sim in ((i2t, itc), (t2i, itc.t())):
        for row, s in zip(scores, sim):
            top = set(s.topk(3).indices.tolist())
            order = row.argsort(descending=True).tolist()
            assert set(order[:3]) == top  # re-ranking never lets a non-top-k candidate in
            rest = [c for c in s.argsort(descending=True).tolist() if c not in top]
            assert order[3:] == rest  # and the others keep their ITC order


# ----------------------------------------------------------------------------- 8. baselines


def test_nearest_neighbour_captions():
    train_x = torch.eye(3, 8)
    caps = [["a dog on the grass", "a dog on grass", "cat"], ["a red bus"], ["two birds", "birds on a wire"]]
    test_x = torch.stack([train_x[2] * 3 + 0.1, train_x[0] + 0.2 * train_x[1]])
    out = nearest_neighbour_captions(train_x, caps, test_x)
    assert out[0] in caps[2]
    assert out[1] in ("a dog on the grass", "a dog on grass")  # the consensus caption, not the odd "cat"


def test_linear_probe_learns_aligned_features():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 6, generator=g)  # a shared latent: image and text views of the same 64 "pairs"
    image_x = z @ torch.randn(6, 20, generator=g) + 0.1 * torch.randn(64, 20, generator=g)
    text_x = z @ torch.randn(6, 12, generator=g) + 0.1 * torch.randn(64, 12, generator=g)
    probe, losses = train_linear_probe(image_x, text_x, steps=60, batch_size=16, lr=1e-2, warmup=5)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    # and it retrieves: each image's best text is its own far more often than chance (1/64)
    sims = probe.encode_image(image_x).squeeze(1) @ probe.encode_text(text_x).t()
    assert (sims.argmax(1) == torch.arange(64)).float().mean() > 0.5


@pytest.fixture(scope="module")
def tiny_llama_and_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from minblip2.backbones import load_bert

    tok = load_bert(QFormerConfig(bert_weights="random"))[1]
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       pad_token_id=0, bos_token_id=101, eos_token_id=102))
    return llm, tok


def _linear_projection_model(llm, tok, num_queries, projector="linear"):
    q = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_queries=num_queries,
                      vision_width=24, vocab_size=30523, max_position_embeddings=40)
    return LinearProjectionModel(q, llm, tok, projector=projector, max_text_len=8)


def test_linear_projection_baseline(tiny_llama_and_tokenizer):
    llm, tok = tiny_llama_and_tokenizer
    model = _linear_projection_model(llm, tok, num_queries=16)
    assert not hasattr(model, "qformer")
    img = torch.randn(2, 1 + 16 * 16, 24)  # [CLS] + a 16x16 patch grid
    prompt = model.visual_prompt(img)
    assert prompt.shape == (2, 16, 32)
    # token (0, 0) of the 4x4 output is the mean of the top-left 4x4 patches (after ln_vision), projected
    x = model.ln_vision(img)[:, 1:].reshape(2, 16, 16, 24)
    assert torch.allclose(prompt[:, 0], model.llm_proj(x[:, :4, :4].mean((1, 2))), atol=1e-5)
    loss = model(img, ["a red square", "two cats"])["loss"]
    loss.backward()
    assert model.llm_proj.weight.grad.abs().sum() > 0  # trains like stage 2 ...
    assert all(p.grad is None for p in model.llm.parameters())  # ... through the frozen LLM


def test_mlp_projection_baseline_is_llava_15s_two_layers(tiny_llama_and_tokenizer):
    llm, tok = tiny_llama_and_tokenizer
    model = _linear_projection_model(llm, tok, num_queries=16, projector="mlp")
    first, act, second = model.llm_proj
    assert (first.in_features, first.out_features, second.out_features) == (24, 32, 32)
    assert isinstance(act, nn.GELU)
    img = torch.randn(2, 1 + 16 * 16, 24)
    x = model.ln_vision(img)[:, 1:].reshape(2, 16, 16, 24)
    assert torch.allclose(model.visual_prompt(img)[:, 0], second(F.gelu(first(x[:, :4, :4].mean((1, 2))))), atol=1e-5)
    model(img, ["a red square", "two cats"])["loss"].backward()
    assert first.weight.grad.abs().sum() > 0 and second.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="projector must be"):
        _linear_projection_model(llm, tok, num_queries=16, projector="conv")


def test_linear_projection_baseline_non_square_queries(tiny_llama_and_tokenizer):
    llm, tok = tiny_llama_and_tokenizer
    model = _linear_projection_model(llm, tok, num_queries=32)
    assert model.visual_prompt(torch.randn(1, 1 + 16 * 16, 24)).shape == (1, 32, 32)


# ----------------------------------------------------------------------------- stage-1 options of the cpu preset


def test_mean_text_pooling_ignores_padding_and_differs_from_cls():
    cfg = tiny_config()
    cfg.qformer.text_pooling = "mean"
    torch.manual_seed(0)
    model = Stage1Model(cfg.qformer, cfg.stage1).eval()
    ids = torch.tensor([[101, 1037, 2417, 2675, 102]])
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # three [PAD]s after [SEP]
    a = model.encode_text(ids, torch.ones_like(ids))
    b = model.encode_text(padded, (padded != 0).long())
    assert torch.allclose(a, b, atol=1e-6)  # pads are masked out of the mean (and out of attention)
    h = model.qformer(input_ids=ids, text_mask=torch.ones_like(ids))
    assert torch.allclose(a, F.normalize(model.text_proj(h.mean(1)), dim=-1), atol=1e-6)
    model.qcfg.text_pooling = "cls"
    assert not torch.allclose(a, model.encode_text(ids, torch.ones_like(ids)), atol=1e-3)
    model.qcfg.text_pooling = "max"
    with pytest.raises(ValueError, match="text_pooling"):
        model.encode_text(ids, torch.ones_like(ids))


def test_pretrained_lr_scale_slows_only_the_bert_initialised_weights(tmp_path):
    """Scale 0: after training, what BERT initialised is untouched and everything fresh has moved."""
    cfg = tiny_config(max_steps=3, pretrained_lr_scale=0.0, weight_decay=0.0)
    task = tiny_task(cfg)
    model = task.model
    model.pretrained_names = {n for n, _ in model.named_parameters() if n.startswith("qformer.layers.0.self_attn")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(cfg, 1, task, resume=False, progress=False, run_dir=tmp_path)
    after = dict(model.named_parameters())
    for n in model.pretrained_names:
        assert torch.equal(before[n], after[n]), n
    assert not torch.equal(before["qformer.query_tokens"], after["qformer.query_tokens"])
    assert not torch.equal(before["qformer.layers.1.self_attn.query.weight"], after["qformer.layers.1.self_attn.query.weight"])


def test_pretrained_frozen_steps_train_the_fresh_weights_first(tmp_path):
    """pretrained_frozen_steps=2: what came pretrained stays exactly as it was for 2 steps while the fresh weights
    move; from step 3 on it trains too (and a resume in between keeps the schedule)."""
    cfg = tiny_config(max_steps=3, pretrained_frozen_steps=2, weight_decay=0.0)
    task = tiny_task(cfg)
    model = task.model
    model.pretrained_names = {n for n, _ in model.named_parameters() if n.startswith("qformer.layers.0.self_attn")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(cfg, 1, task, resume=False, stop_at=2, progress=False, run_dir=tmp_path)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in model.pretrained_names)
    assert not torch.equal(before["qformer.query_tokens"], after["qformer.query_tokens"])
    train(cfg, 1, task, progress=False, run_dir=tmp_path)  # resumes at step 2: no longer frozen
    assert all(not torch.equal(before[n], after[n]) for n in model.pretrained_names if n.endswith("weight"))


def test_build_stage1_model_marks_what_bert_initialised():
    from minblip2.config import cpu
    from minblip2.tasks import build_stage1_model

    model, _ = build_stage1_model(cpu())
    slow = model.pretrained_names
    assert "qformer.layers.0.self_attn.query.weight" in slow and "qformer.word_embeddings.weight" in slow
    assert "qformer.layers.0.query_ffn.fc1.weight" in slow  # the query FFN is a copy of BERT's
    for fresh in ("qformer.query_tokens", "qformer.layers.0.cross_attn.key.weight", "vision_proj.weight", "temp"):
        assert fresh not in slow


def test_cached_views_cycle_through_every_caption_and_view(monkeypatch):
    """Sample j = caption j % num_captions through view j // num_captions (view 0 = the center crop), and the
    linear probe trains on exactly those pairs."""
    from ddp_worker import synthetic_data
    from minblip2.tools.baselines import probe_training_pairs

    data = synthetic_data(num_images=5)  # 10 captions
    data.features = data.features.half()  # stored like the real cache
    data.views = [data.features + 100 * v for v in (1, 2)]  # two "augmented" views, told apart by their offset
    n = len(data)
    assert data.num_samples == 3 * n
    idx = torch.tensor([0, n + 3, 2 * n + 3, 2 * n - 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as train() calls it
        emb, caps, ids = data.batch(idx, "cpu")
    assert emb.dtype == torch.float32
    for j, e, c, i in zip(idx.tolist(), emb, caps, ids):
        cap, view = j % n, j // n
        row = data.row_of_caption[cap]
        assert torch.equal(e, (data.features[row] + 100 * view).float())
        assert c == data.captions[cap] and i == data.image_ids[cap]
    # the text encoder is tested elsewhere; here only the row order matters: caption i -> [i]
    monkeypatch.setattr("minblip2.tools.baselines.pooled_text_features",
                        lambda bert, tok, caps: torch.arange(len(caps)).float().unsqueeze(1))
    image_x, text_x = probe_training_pairs(data, None, None)
    assert image_x.shape[0] == text_x.shape[0] == 3 * n
    for j in idx.tolist():
        assert torch.equal(image_x[j], emb[idx.tolist().index(j)][0])  # the [CLS] of the very tokens trained on
        assert text_x[j, 0] == j % n


def test_frozen_phase_computes_no_gradient_for_the_pretrained_weights(tmp_path):
    """During pretrained_frozen_steps the pretrained weights get no gradient at all (not a gradient with lr 0): no
    backward through them, nothing of theirs in clip_grad_norm_, no AdamW moments accumulating for the switch."""
    cfg = tiny_config(max_steps=4, pretrained_frozen_steps=2, weight_decay=0.0, ckpt_every=1)
    task = tiny_task(cfg)
    model = task.model
    model.pretrained_names = {n for n, _ in model.named_parameters() if n.startswith("qformer.layers.0.self_attn")}
    watched = dict(model.named_parameters())["qformer.layers.0.self_attn.query.weight"]
    calls = []
    watched.register_hook(lambda g: calls.append(1))
    train(cfg, 1, task, resume=False, stop_at=2, progress=False, run_dir=tmp_path)
    assert calls == []  # autograd never computed its gradient
    state = torch.load(latest_checkpoint(tmp_path / "checkpoints") / "state.pt", weights_only=True)["optimizer"]
    frozen = [i for g in state["param_groups"] if g["pretrained"] for i in g["params"]]
    fresh = [i for g in state["param_groups"] if not g["pretrained"] for i in g["params"]]
    assert frozen and fresh
    assert all(i not in state["state"] for i in frozen)  # AdamW has no moments for them yet
    assert all(int(state["state"][i]["step"]) == 2 for i in fresh)
    train(cfg, 1, task, progress=False, run_dir=tmp_path)  # steps 3-4: they train, with fresh moments
    assert len(calls) == 2
    state = torch.load(latest_checkpoint(tmp_path / "checkpoints") / "state.pt", weights_only=True)["optimizer"]
    assert all(int(state["state"][i]["step"]) == 2 for i in frozen)  # steps 3 and 4 only


def test_unfrozen_weights_warm_up_again():
    from minblip2.train import unfrozen_warmup

    t = TrainConfig(warmup_steps=4, pretrained_frozen_steps=10)
    assert [unfrozen_warmup(s, t) for s in (0, 9, 10, 11, 13, 50)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert unfrozen_warmup(0, TrainConfig(warmup_steps=4)) == 1.0  # nothing frozen: no factor


def test_temperature_is_logged_and_clamped(tmp_path):
    """ITC's temperature trains (lr 1e-3, no decay in the cpu preset): log.csv shows it, clamp_temp keeps it in
    ALBEF's [0.001, 0.5]."""
    run_dir = run(tmp_path / "clamped", max_steps=2, init_temp=0.9, clamp_temp=True)
    temps = [float(r["temp"]) for r in log(run_dir)]
    assert len(temps) == 2 and all(0.001 <= t <= 0.5 for t in temps)
    assert temps[0] == 0.5, "step 1 logs the temperature its loss used (clamped), not the one after the update"
    free = run(tmp_path / "free", max_steps=2, init_temp=0.9, clamp_temp=False)
    assert float(log(free)[0]["temp"]) > 0.5
