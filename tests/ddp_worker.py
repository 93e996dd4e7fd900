"""A tiny stage-1 task on synthetic features, shared by tests/test_train.py and tests/test_ddp.py.

As a script it trains that task (for the DDP test under torchrun, and the kill test as a subprocess):

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py RUN_DIR --batch_size=4 --max_steps=4 --stop_at=3
    python tests/ddp_worker.py RUN_DIR --ckpt_every=1 --max_steps=30
    ... --check_devices=True    (every collective's tensors must be on the run's device: see DeviceChecks)
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py stage2 RUN_DIR   (what DDP broadcasts in stage 2)
    ... --node_dirs=True        (each process its own RUN_DIR/node<rank>, as on nodes without a shared filesystem)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from minblip2.config import Config, QFormerConfig, Stage1Config

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def subprocess_env() -> dict:
    """The environment for a test's subprocess: no inherited torchrun variables, and THIS checkout first on
    PYTHONPATH (a script's sys.path starts at tests/, so without it a worker imports the INSTALLED minblip2,
    which in another checkout, e.g. a git worktree, is not the code under test)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def torchrun(script: str, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    """2 processes of tests/<script> under torchrun (gloo on CPU); asserts they succeed."""
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
           str(TESTS / script), *map(str, args)]
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


COLORS = ["red", "green", "blue", "black", "white"]
SHAPES = ["square", "circle", "triangle", "star"]


def tiny_config(**stage1) -> Config:
    """A 2-layer, 32-wide Q-Former with 4 queries over 24-dim image tokens; the recipe overridable."""
    cfg = Config()
    cfg.device = "cpu"
    cfg.qformer = QFormerConfig(bert_weights="random", hidden_size=32, num_layers=2, num_heads=4,
                                intermediate_size=64, num_queries=4, cross_attention_freq=2, vision_width=24,
                                embed_dim=16, vocab_size=30523, dec_token_id=30522, max_position_embeddings=40)
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=8, batch_size=8, amp="none", ckpt_every=2,
              log_every=1, seed=0)
    kw.update(stage1)
    cfg.stage1 = Stage1Config(**kw)
    return cfg


def synthetic_data(num_images: int = 40, tokens: int = 9, dim: int = 24, seed: int = 0):
    """40 "images" (random 9x24 tokens), 2 captions each ("a red square", "the square is red"), so 80 pairs.

    The two captions differ in length (5 and 6 tokens with [CLS]/[SEP]), so batches split over processes
    hold different numbers of ITG target tokens -- what the DDP test needs to catch a per-process token mean.
    """
    from minblip2.tasks import ImageTextData

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(num_images, tokens, dim, generator=g)
    caps, rows = [], []
    for i in range(num_images):
        c, s = COLORS[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
        caps += [f"a {c} {s}", f"the {s} is {c}"]
        rows += [i, i]
    rows = torch.tensor(rows)
    return ImageTextData(captions=caps, image_ids=rows + 1000, image_paths=[f"img{i}.jpg" for i in range(num_images)],
                         row_of_caption=rows, encoder=torch.nn.Identity(), features=feats)


def tiny_task(cfg: Config, model_seed: int | None = None, init_scale: float = 5.0):
    """The StageTask train() runs: a Stage1Model with random weights (seeded by model_seed, default the
    recipe's seed), the synthetic data, the offline BERT tokenizer (+ [DEC])."""
    from minblip2.backbones import load_bert
    from minblip2.stage1 import Stage1Model
    from minblip2.tasks import Stage1Task

    torch.manual_seed(cfg.stage1.seed if model_seed is None else model_seed)  # as build_task: after seeding
    model = Stage1Model(cfg.qformer, cfg.stage1)
    # BERT's std-0.02 init leaves a tiny random Q-Former's queries almost blind to the image: every image gets
    # ~the same features, ITC sits at ln(B) and its gradient is a cancellation of large terms with ~0.5%
    # float32 noise, which Adam's normalised step turns into ~1e-5 weight noise. std 0.1 is well conditioned.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(init_scale)
    tokenizer = load_bert(cfg.qformer)[1]
    unused = set(cfg.stage1.losses) != {"itc", "itm", "itg"}
    return Stage1Task(model, synthetic_data(), has_unused_parameters=unused, tokenizer=tokenizer, max_text_len=16)


# ----------------------------------------------------------------------------- collectives on the right device
# NCCL reduces GPU tensors only: `dist.all_reduce(torch.tensor(loss))` -- a CPU tensor -- kills a multi-GPU run at its
# first step. gloo on CPUs accepts any tensor, and here the run's device IS the CPU, so checking devices alone
# proves nothing. So DeviceChecks also follows where each tensor came from: a factory call (torch.tensor,
# torch.zeros, ...) without `device=` makes a CPU tensor whatever the run's device, and that mark passes to every
# tensor computed from it, until an explicit `.to(device)`. A collective handed such a tensor would get a CPU
# tensor on a GPU: the check fails it here, on a CPU, as NCCL would there.

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace, torch.scalar_tensor,
             torch.from_numpy}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier")
MARK = "_made_without_device"


class DeviceChecks(TorchFunctionMode):
    """Marks tensors made without `device=` (and all computed from them); wraps torch.distributed's collectives
    to assert that each tensor they get is on `device` and unmarked. `calls` counts the collectives checked."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.calls, self.originals = device, {}, {}
        self.bytes = {}  # per collective: the bytes of every tensor handed to it (inputs and output buffers)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        marked = any(getattr(t, MARK, False) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        if func in FACTORIES:  # (as_tensor of a tensor keeps that tensor's mark)
            marked = marked or kwargs.get("device") is None
        elif func is torch.Tensor.to:  # an explicit device places it; .to(dtype) does not
            marked = marked and kwargs.get("device") is None and not any(
                isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])
        elif func in (torch.Tensor.cuda, torch.Tensor.cpu):
            marked = False
        elif not marked:
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                setattr(t, MARK, marked)
        return out

    def check(self, name, *args, **kwargs):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                where = f"torch.distributed.{name} got a {tuple(t.shape)} {t.dtype} tensor"
                assert t.device == self.device, f"{where} on {t.device}, not on the run's device {self.device}"
                assert not getattr(t, MARK, False), (
                    f"{where} made by a factory call without device= (e.g. torch.tensor(value)): on a GPU it "
                    f"would live on the CPU, which NCCL cannot reduce")
        self.calls[name] = self.calls.get(name, 0) + 1
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.bytes[name] = self.bytes.get(name, 0) + sum(t.numel() * t.element_size() for t in tensors)

    def __enter__(self):
        for name in COLLECTIVES:
            original = self.originals[name] = getattr(torch.distributed, name)

            def checked(*args, _name=name, _original=original, **kwargs):
                self.check(_name, *args, **kwargs)
                return _original(*args, **kwargs)
            setattr(torch.distributed, name, checked)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.distributed, name, original)
        return super().__exit__(*exc)


def tiny_stage2_task(cfg: Config):
    """A Stage2Task over a tiny random OPT (2 layers, 32 wide; the same weights in every process: seeded alike), a
    Q-Former as tiny_config's and the synthetic data; its frozen LLM holds most of the model's bytes."""
    from transformers import OPTConfig, OPTForCausalLM

    from minblip2.backbones import load_bert
    from minblip2.stage2 import Stage2Model
    from minblip2.tasks import Stage2Task

    tok = load_bert(cfg.qformer)[1]
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    llm = OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                   pad_token_id=0, bos_token_id=101, eos_token_id=102))
    torch.manual_seed(cfg.stage2.seed)
    model = Stage2Model(cfg.qformer, llm, tok, prompt="a photo of", max_text_len=12)
    return Stage2Task(model, synthetic_data())


class CountBroadcasts:
    """Counts the bytes every broadcast of torch.distributed sends, DDP's coalesced start-up broadcast included."""

    def __init__(self):
        self.bytes, self.originals = 0, {}

    def __enter__(self):
        for name in ("broadcast", "_broadcast_coalesced"):
            original = self.originals[name] = getattr(torch.distributed, name)

            def counted(*args, _original=original, **kwargs):
                self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs))
                                  if isinstance(t, torch.Tensor))
                return _original(*args, **kwargs)
            setattr(torch.distributed, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.distributed, name, original)


def stage2_main(run_dir):
    """stage2 RUN_DIR: 2 stage-2 steps of tiny_stage2_task; process 1's final LayerNorm of the LLM is changed first.
    Writes per process the bytes broadcast, the trainable and the frozen bytes, and a checksum of the LLM."""
    from minblip2 import dist
    from minblip2.config import Stage2Config
    from minblip2.train import train

    cfg = tiny_config()
    cfg.stage2 = Stage2Config(lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=2, batch_size=4, amp="none",
                              ckpt_every=2, log_every=1, seed=0)
    try:
        dist.setup("cpu")
        task = tiny_stage2_task(cfg)
        llm = task.model.llm
        if dist.rank() == 1:  # a frozen tensor that differs: it alone must be sent
            with torch.no_grad():
                llm.model.decoder.final_layer_norm.weight.add_(1.0)
        with CountBroadcasts() as counted:
            train(cfg, 2, task, progress=False, run_dir=run_dir)
        size = lambda ps: sum(p.numel() * p.element_size() for p in ps)
        Path(run_dir, f"broadcast-rank{dist.rank()}.json").write_text(json.dumps({
            "broadcast_bytes": counted.bytes,
            "trainable_bytes": size(p for p in task.model.parameters() if p.requires_grad),
            "llm_bytes": size(llm.parameters()) + size(llm.buffers()),
            "layer_norm_bytes": size([llm.model.decoder.final_layer_norm.weight]),
            "llm_checksum": sum(float(p.double().sum()) for p in llm.parameters())}))
    finally:
        dist.cleanup()


def main(argv):
    """RUN_DIR [--field=value ...] (Stage1Config fields, plus --stop_at, --threads, --qformer.dropout)."""
    import ast

    from minblip2 import dist
    from minblip2.train import train

    run_dir, kw = argv[0], {}
    for a in argv[1:]:
        k, _, v = a.lstrip("-").partition("=")
        kw[k] = ast.literal_eval(v)
    stop_at = kw.pop("stop_at", None)
    if "threads" in kw:
        torch.set_num_threads(kw.pop("threads"))
    dropout = kw.pop("qformer.dropout", None)
    check_devices = kw.pop("check_devices", False)
    if kw.pop("node_dirs", False):  # RUN_DIR/node<rank>: a run directory no other process sees (node-local disks)
        run_dir = str(Path(run_dir, f"node{os.environ['RANK']}"))
    cfg = tiny_config(**kw)
    if dropout is not None:
        cfg.qformer.dropout = dropout
    try:
        task = tiny_task(cfg)
        if not check_devices:
            train(cfg, 1, task, stop_at=stop_at, progress=False, run_dir=run_dir)
        else:
            with DeviceChecks(torch.device(cfg.device)) as checks:
                train(cfg, 1, task, stop_at=stop_at, progress=False, run_dir=run_dir)
            Path(run_dir, f"collectives-rank{dist.rank()}.json").write_text(json.dumps(checks.calls))
            Path(run_dir, f"collective-bytes-rank{dist.rank()}.json").write_text(json.dumps(checks.bytes))
    finally:
        dist.cleanup()


if __name__ == "__main__":
    if sys.argv[1] == "stage2":
        stage2_main(sys.argv[2])
    else:
        main(sys.argv[1:])
