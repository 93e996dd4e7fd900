"""minblip2 installs like a package: the wheel built from this checkout holds every package under minblip2/, its
named commands print usage with an example, and installed on its own it trains.

The install test makes no download: it builds the wheel without build isolation (setuptools comes with the dev
extras), installs it with --no-deps into a fresh venv, and makes the heavy dependencies (torch, transformers, timm,
the offline weights ...) visible there through a .pth file that lists this environment's site-packages as a plain
path. A plain path line does not run the editable install's finder, so the fresh venv imports the WHEEL's
minblip2 (checked), not this checkout.
"""
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "minblip2"
COMMANDS = {"minblip2-train": "minblip2.train", "minblip2-coco-mini": "minblip2.tools.coco_mini",
            "minblip2-caption": "minblip2.apps.caption", "minblip2-search": "minblip2.apps.search"}


def source_files() -> set[str]:
    """minblip2/... paths of the checkout's package files (no caches)."""
    return {p.relative_to(REPO).as_posix() for p in SRC.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def build_wheel(out: Path) -> Path:
    """The wheel of this checkout, built from a copy of what goes into it (a stale build/ in the checkout would
    otherwise fill gaps, and the checkout stays clean)."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(SRC, src / "minblip2", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "-q", "-w", str(out / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    (wheel,) = (out / "dist").glob("minblip2-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_every_folder_of_python_files_is_a_package():
    """A folder of modules without __init__.py would be a namespace package: easy to leave out of a wheel."""
    folders = {p.parent for p in SRC.rglob("*.py") if "__pycache__" not in p.parts}
    assert [f.relative_to(REPO).as_posix() for f in sorted(folders) if not (f / "__init__.py").is_file()] == []


def test_the_wheel_holds_every_package_and_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    expected = {p.parent.relative_to(REPO).as_posix() for p in SRC.rglob("__init__.py") if "__pycache__" not in p.parts}
    assert {"minblip2", "minblip2/tools", "minblip2/apps"} <= expected
    assert sorted(expected - packages) == [], "packages missing from the wheel: see pyproject.toml's packages.find"
    assert sorted(source_files() - names) == []


def test_the_wheel_declares_the_named_commands(wheel):
    zf = zipfile.ZipFile(wheel)
    eps = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert len(eps) == 1, "the wheel declares no commands: see pyproject.toml's [project.scripts]"
    ep = eps[0]
    lines = zf.read(ep).decode().split("[console_scripts]")[1].split("[")[0].strip().splitlines()
    scripts = dict(line.replace(" ", "").split("=") for line in lines)
    assert scripts == {name: f"{module}:main" for name, module in COMMANDS.items()}
    for module in COMMANDS.values():
        assert "\ndef main(" in zf.read(module.replace(".", "/") + ".py").decode()


@pytest.mark.parametrize("name", COMMANDS)
def test_help_prints_usage_with_an_example(name, capsys):
    module = importlib.import_module(COMMANDS[name])
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: {name} ")
    examples = [line for line in out.splitlines() if line.lstrip().startswith(f"{name} ")]
    assert examples, f"{name} --help shows no example command line"


TINY = [  # tests/test_pipeline.py's tiny run, as command-line overrides of the cpu preset: 2 steps per stage
    "--device=cpu", "--vision.name=vit_tiny_patch16_224", "--vision.weights=random", "--vision.img_size=32",
    "--qformer.bert_weights=random", "--qformer.hidden_size=32", "--qformer.num_layers=2", "--qformer.num_heads=4",
    "--qformer.intermediate_size=64", "--qformer.num_queries=4", "--qformer.vision_width=192",
    "--qformer.embed_dim=16", "--qformer.max_position_embeddings=40", "--llm.weights=hub", "--llm.dtype=float32",
    "--data.max_text_len=16", "--data.augmented_views=1", "--eval.num_beams=1", "--eval.max_new_tokens=5",
    *[f"--stage{s}.{k}" for s in (1, 2) for k in
      ("max_steps=2", "batch_size=4", "warmup_steps=1", "amp=none", "ckpt_every=2", "log_every=1")],
    "--stage2.pretrained_frozen_steps=1",
]


@pytest.mark.slow
def test_the_installed_wheel_trains_both_stages_and_captions(wheel, tmp_path):
    from test_pipeline import COLORS, draw, tiny_llm_dir

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "--disable-pip-version-check", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # this env's, as plain paths
    (site / "minblip2-test-deps.pth").write_text("".join(f"{d}\n" for d in deps))

    work = tmp_path / "work"  # the current directory: not the checkout, so nothing imports it by accident
    data = work / "data" / "coco-mini"  # where an installed minblip2 looks first, from here
    images = data / "images"
    images.mkdir(parents=True)
    rows = []
    for i, (color, shape) in enumerate([(c, s) for s in ("square", "circle") for c in COLORS]):
        draw(color, shape).save(images / f"{i}.png")
        rows.append({"image_id": i, "file": f"images/{i}.png", "split": "train",
                     "captions": [f"a {color} {shape}", f"the {shape} is {color}"]})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    llm = tiny_llm_dir(tmp_path / "llm")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MINBLIP2_DATA", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(MINBLIP2_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def run(*cmd) -> str:
        p = subprocess.run([str(c) for c in cmd], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        return p.stdout

    where = run(py, "-c", "import minblip2, minblip2.config as c; print(minblip2.__file__); print(c.REPO_ROOT)")
    assert where.splitlines() == [str(site / "minblip2" / "__init__.py"), str(work)]  # the wheel's; data from here

    bin_ = venv / "bin"
    tiny = [*TINY, f"--llm.name={llm}", "--out_dir=runs/tiny"]
    run(bin_ / "minblip2-train", "--stage", "1", "--preset", "cpu", *tiny)
    run(bin_ / "minblip2-train", "--stage", "2", "--preset", "cpu", *tiny)
    for stage in (1, 2):
        d = work / "runs" / "tiny" / f"stage{stage}"
        assert (d / "checkpoints" / "latest").exists() and (d / "losses.png").is_file()  # tools.plots shipped
        assert len((d / "log.csv").read_text().splitlines()) == 1 + 2
    out = run(bin_ / "minblip2-caption", "runs/tiny", images / "0.png", images / "5.png", "--greedy",
              "--device", "cpu", "--no_progress")
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(images / "0.png"), str(images / "5.png")]
