"""Use a trained minblip2 from Python: caption, answer, embed and search.

    from minblip2.apps.pipeline import load
    blip = load("runs/coco-mini")                # a run directory: its config.json and latest checkpoints
    blip.caption("photo.jpg")                    # -> 'a dog lying on a couch'
    blip.answer("photo.jpg", "What is the dog lying on?")
    blip.search("a dog on a couch", ["a.jpg", "b.jpg", "c.jpg"], k=2)   # -> [Hit(index, score, itc, itm), ...]

A run directory is what `minblip2-coco-mini` writes (stage1/ and stage2/ inside) or `minblip2-train --stage N
--out_dir=DIR` writes (DIR/stageN/); a stage directory or one ckpt-* directory works too. Stage 2 (with
its frozen LLM) captions and answers; stage 1 embeds and searches. Images are paths or PIL images; one image (or
text) in gives one result out, a list gives a list. `from_pretrained_blip2(name)` builds the same object from the
released BLIP-2 weights (convert.py). The command lines are `minblip2-caption` and `minblip2-search`.
"""
from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file

from .. import runtime
from ..backbones import freeze, load_image_encoder
from ..config import Config, QFormerConfig
from ..data import BadImageError, eval_transform, load_image, tokenize
from ..losses import itc_similarities
from ..stage2 import vqa_prompt

Hit = namedtuple("Hit", "index score itc itm")  # a search result: images[index]; itm = P(match) or None (no re-rank)


class RunError(ValueError):
    """A run directory or checkpoint that cannot give the model asked for; the message says why and what to do."""


class HubUnavailableError(OSError):
    """Released weights asked for, but the Hugging Face hub cannot be reached (and they are not cached)."""


def open_image(image) -> Image.Image:
    """A path or a PIL image -> an RGB PIL image. A missing file or a non-image: BadImageError naming it."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"an image is a path or a PIL image, not {type(image).__name__}")
    if not Path(image).is_file():
        raise BadImageError(f"no such image file: {image}")
    try:
        return load_image(image)
    except BadImageError as e:
        why = "not an image file" if isinstance(e.__cause__, UnidentifiedImageError) else str(e.__cause__)
        raise BadImageError(f"{image} is not a readable image ({why})") from None


def _as_list(x, one=(str, os.PathLike, Image.Image)):
    """(items, single): one item becomes a list of one, and the answer is unwrapped again."""
    return ([x], True) if isinstance(x, one) else (list(x), False)


class Blip2:
    """A trained BLIP-2, ready to use. Build it with `load(run_dir)` or `from_pretrained_blip2(name)`.

    retriever: a Stage1Model (embed_*, search) with its Q-Former tokenizer; captioner: a Stage2Model (caption,
    answer); encoders: the frozen image encoder each was trained on, {"retriever": ..., "captioner": ...}.
    """

    def __init__(self, retriever=None, tokenizer=None, captioner=None, encoders=None, max_text_len: int = 32,
                 generation: dict | None = None, device="cpu", batch_size: int = 16, amp: str = "none",
                 source: str = "", fingerprint: str = ""):
        self.retriever, self.tokenizer, self.captioner = retriever, tokenizer, captioner
        self.encoders, self.max_text_len, self.device = encoders or {}, max_text_len, torch.device(device)
        self.generation = {"num_beams": 5, "max_new_tokens": 30, "no_repeat_ngram_size": 0, **(generation or {})}
        self.batch_size, self.amp, self.source = batch_size, amp, source
        self.fingerprint = fingerprint or source  # what the search cache checks: the retriever's weights

    def __repr__(self):
        parts = [p for p in ("retriever", "captioner") if getattr(self, p) is not None]
        return f"Blip2({self.source!r}, {' + '.join(parts)}, device={self.device.type})"

    def _need(self, part: str):
        if getattr(self, part) is None:
            stage, does = (1, "embeddings and search") if part == "retriever" else (2, "captions and answers")
            raise RunError(f"{self.source} has no stage-{stage} checkpoint: {does} need one (train it with "
                           f"minblip2-train --stage {stage} --out_dir=...)")
        return getattr(self, part)

    def _batches(self, items: list, progress: bool, desc: str):
        bar = runtime.progress_bar(None, progress, total=len(items), desc=desc, unit="img", leave=False)
        for i in range(0, len(items), self.batch_size):
            yield i, items[i:i + self.batch_size]
            bar.update(len(items[i:i + self.batch_size]))
        bar.close()

    @torch.no_grad()
    def image_tokens(self, images: list, part: str = "captioner") -> torch.Tensor:
        """Images -> the frozen encoder's tokens (B, N, D), float32 on the device, through its eval transform."""
        encoder = self.encoders[part]
        transform = eval_transform(encoder.img_size, encoder.mean, encoder.std)
        pixels = torch.stack([transform(open_image(x)) for x in images]).to(self.device)
        with runtime.autocast(self.amp, self.device):
            return encoder(pixels).float()

    @torch.no_grad()
    def caption(self, images, prompt=None, num_beams: int | None = None, max_new_tokens: int | None = None,
                no_repeat_ngram_size: int | None = None, progress: bool = False):
        """A caption per image (a str for one image). prompt: the text after the visual prompt (None = the one the
        model was trained with; one str, or one per image). num_beams=1 is greedy. Decoding defaults (None) come
        from the run's config (`self.generation`); no_repeat_ngram_size=0 lets the text repeat itself."""
        model = self._need("captioner")
        items, single = _as_list(images)
        asked = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size)
        kw = {**self.generation, **{k: v for k, v in asked.items() if v is not None}}
        if not (prompt is None or isinstance(prompt, str)) and len(prompt := list(prompt)) != len(items):
            raise ValueError(f"{len(prompt)} prompts for {len(items)} images")
        out = []
        for i, chunk in self._batches(items, progress, "captions"):
            p = prompt if prompt is None or isinstance(prompt, str) else prompt[i:i + len(chunk)]
            with runtime.autocast(self.amp, self.device):
                out += model.generate(self.image_tokens(chunk, "captioner"), prompt=p, **kw)
        return out[0] if single else out

    def answer(self, images, question, **kw):
        """Zero-shot VQA with the paper's prompt ("Question: ... Answer:"). One image and several questions, one
        question for several images, or one question per image."""
        style = "t5" if self._need("captioner").is_encoder_decoder else "opt"
        questions, one_question = _as_list(question, str)
        items, single = _as_list(images)
        if single and not one_question:
            items, single = items * len(questions), False
        if kw.get("max_new_tokens") is None:
            kw["max_new_tokens"] = 10  # answers are short
        prompts = [vqa_prompt(q, style) for q in questions]
        out = self.caption(items, prompt=prompts[0] if one_question else prompts, **kw)
        return out[0] if single else out

    @torch.no_grad()
    def embed_images(self, images, progress: bool = False) -> torch.Tensor:
        """(N, Q, E) L2-normalised ITC embeddings (one per query) on the CPU, N = number of images."""
        model = self._need("retriever")
        items, _ = _as_list(images)
        out = []
        for _, chunk in self._batches(items, progress, "image embeddings"):
            with runtime.autocast(self.amp, self.device):
                out.append(model.encode_image(self.image_tokens(chunk, "retriever"))[0].float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        """(N, E) L2-normalised ITC text embeddings on the CPU."""
        model = self._need("retriever")
        items, _ = _as_list(texts, str)
        out = []
        for _, chunk in self._batches(items, False, "text embeddings"):
            tok = tokenize(self.tokenizer, chunk, self.max_text_len)
            with runtime.autocast(self.amp, self.device):
                out.append(model.encode_text(tok["input_ids"].to(self.device),
                                             tok["attention_mask"].to(self.device)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def search(self, texts, images, k: int = 5, rerank: int = 0, image_embeds: torch.Tensor | None = None):
        """The k best of `images` for each text, best first: [Hit(index, score, itc, itm), ...] (one list per text;
        a single str gives one list). Ranked by ITC (cosine similarity, max over the image's queries); rerank=n
        re-scores the ITC top n with the ITM head, score = P(match) + ITC. image_embeds: `embed_images(images)`
        computed earlier (a search index); re-ranking still reads the candidates' pixels."""
        model = self._need("retriever")
        queries, single = _as_list(texts, str)
        images = _as_list(images)[0]
        emb = self.embed_images(images) if image_embeds is None else image_embeds.float()
        if len(emb) != len(images):
            raise ValueError(f"{len(emb)} image embeddings for {len(images)} images")
        itc = itc_similarities(emb, self.embed_texts(queries))  # (images, texts)
        results = []
        for j, query in enumerate(queries):
            sims = itc[:, j]
            if rerank <= 0:
                top = sims.topk(min(k, len(sims)))
                results.append([Hit(i, s, s, None) for s, i in zip(top.values.tolist(), top.indices.tolist())])
                continue
            cand = sims.topk(min(max(rerank, k), len(sims))).indices
            tok = tokenize(self.tokenizer, [query], self.max_text_len)
            n = len(cand)
            with runtime.autocast(self.amp, self.device):
                logits = model.itm_logits(self.image_tokens([images[i] for i in cand.tolist()], "retriever"),
                                          tok["input_ids"].to(self.device).expand(n, -1),
                                          tok["attention_mask"].to(self.device).expand(n, -1))
            p = logits.float().softmax(-1)[:, 1].cpu()
            score = p + sims[cand]
            results.append([Hit(int(cand[o]), float(score[o]), float(sims[cand[o]]), float(p[o]))
                            for o in score.argsort(descending=True)[:k].tolist()])
        return results[0] if single else results


# ----------------------------------------------------------------------------- loading a run


def _stage_of(ckpt: Path) -> int:
    try:
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
    except Exception as e:  # truncated / not safetensors
        raise RunError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e})") from e
    if "llm_proj.weight" in keys:
        return 2
    if "vision_proj.weight" in keys:
        return 1
    raise RunError(f"{ckpt}/model.safetensors holds neither a stage-1 nor a stage-2 minblip2 model")


def find_checkpoints(run_dir) -> dict[int, Path]:
    """{stage: its latest checkpoint} in a main-job directory (stage1/, stage2/), a stage directory or a ckpt-*."""
    from ..checkpoint import latest_checkpoint

    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run} is not a directory: give a run directory written by minblip2-coco-mini "
                       f"or minblip2-train")
    found = {}
    for d in (run / "stage1", run / "stage2", run):
        ckpt = d if (d / "model.safetensors").is_file() else latest_checkpoint(d / "checkpoints")
        if ckpt is not None:
            found.setdefault(_stage_of(ckpt), ckpt)
    if not found:
        raise RunError(f"no checkpoint in {run}: expected stage1/ or stage2/ with checkpoints/latest ("
                       f"minblip2-coco-mini, or minblip2-train --stage N --out_dir={run}), or checkpoints/latest")
    return found


def read_config(ckpt: Path) -> Config:
    path = Path(ckpt) / "config.json"
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise RunError(f"{path} is missing: a checkpoint cannot be rebuilt without the config it was trained with")
    except (ValueError, TypeError) as e:
        raise RunError(f"{path} does not fit this version of minblip2: {e}") from e


def _load_stage(ckpt: Path, stage: int, device):
    """(encoder, model, tokenizer, cfg) of one checkpoint: built from its config.json, its weights loaded."""
    from ..tasks import build_stage1_model, build_stage2_model
    from ..checkpoint import load_trainable_state

    cfg = read_config(ckpt)
    with torch.random.fork_rng(devices=[]):
        # frozen parts with weights="random" are rebuilt as `python -m minblip2.train` built them: from the stage's
        # seed, the encoder first, then the LLM (pretrained ones load the same whatever the seed)
        torch.manual_seed((cfg.stage1 if stage == 1 else cfg.stage2).seed)
        encoder = load_image_encoder(cfg.vision)
        if stage == 1:
            model, tokenizer = build_stage1_model(cfg)
        else:
            cfg.stage2.from_stage1 = False  # the stage-2 checkpoint holds its own trained Q-Former
            model, tokenizer = build_stage2_model(cfg), None
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
        load_trainable_state(model, weights, source=f"checkpoint {ckpt}")
    except ValueError as e:
        raise RunError(str(e)) from e
    except Exception as e:
        raise RunError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e})") from e
    return encoder.to(device), model.to(device).eval(), tokenizer, cfg


def _device(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def load(run_dir, stages=None, device: str = "auto", batch_size: int = 16, amp: str = "none") -> Blip2:
    """Load a trained run. stages: None = every stage the run has; (1,) = search only (no LLM loaded); (2,) =
    captions only. A stage asked for that the run lacks is a RunError. amp: "none", "bf16" or "fp16" autocast."""
    found = find_checkpoints(run_dir)
    for s in stages or ():
        if s not in found:
            what = "search needs stage 1" if s == 1 else "captions and answers need stage 2"
            raise RunError(f"{run_dir} has no stage-{s} checkpoint ({what}); it has stage "
                           f"{', '.join(map(str, sorted(found)))}. Train it with minblip2-train --stage {s}")
    dev = _device(device)
    blip = Blip2(device=dev, batch_size=batch_size, amp=amp, source=str(run_dir))
    for s in sorted(stages or found):
        encoder, model, tokenizer, cfg = _load_stage(found[s], s, dev)
        if s == 1:
            blip.retriever, blip.tokenizer, blip.max_text_len = model, tokenizer, cfg.data.max_text_len
            blip.encoders["retriever"] = encoder
            st = (found[1] / "model.safetensors").stat()
            blip.fingerprint = f"{found[1].resolve()}|{st.st_size}|{st.st_mtime_ns}"
        else:
            blip.captioner, blip.encoders["captioner"] = model, encoder
            blip.generation = {"num_beams": cfg.eval.num_beams, "max_new_tokens": cfg.eval.max_new_tokens,
                               "no_repeat_ngram_size": cfg.eval.no_repeat_ngram_size}
    return blip


# ----------------------------------------------------------------------------- the released BLIP-2 weights


class HFVisionEncoder(torch.nn.Module):
    """transformers' Blip2VisionModel as a minblip2 image encoder: its tokens BEFORE post_layernorm (that norm is
    BLIP-2's ln_vision, which convert.py moves into the Q-Former side). Images: 224 px, OpenAI CLIP statistics."""

    def __init__(self, vision_model, img_size: int):
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        super().__init__()
        self.model, self.img_size, self.mean, self.std = vision_model, img_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def forward(self, images):
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        return self.model.encoder(inputs_embeds=self.model.embeddings(images.to(dtype))).last_hidden_state.float()


def from_pretrained_blip2(name: str = "Salesforce/blip2-opt-2.7b", device: str = "auto", batch_size: int = 16,
                          amp: str = "none", dtype: torch.dtype | None = None) -> Blip2:
    """The released BLIP-2 weights in minblip2's models, through convert.py: a retrieval checkpoint
    (Salesforce/blip2-itm-vit-g: embed, search) or a generation one (Salesforce/blip2-opt-2.7b, blip2-flan-t5-xl:
    caption, answer). `name` is a hub id (internet once, then the hub's cache) or a folder saved by transformers."""
    import transformers

    from ..backbones import _dtype_kw
    from ..tools.convert import load_hf_blip2_generation, load_hf_retrieval
    from ..stage1 import Stage1Model
    from ..stage2 import Stage2Model

    try:
        hf_cfg = transformers.Blip2Config.from_pretrained(name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        retrieval = "Blip2ForImageTextRetrieval" in (hf_cfg.architectures or [])
        cls = transformers.Blip2ForImageTextRetrieval if retrieval else transformers.Blip2ForConditionalGeneration
        hf = cls.from_pretrained(name, **(_dtype_kw(dtype) if dtype else {})).eval()
    except OSError as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubUnavailableError(f"cannot load {name!r} ({why}): the released BLIP-2 weights need the Hugging Face "
                                  f"hub (internet) once, or a folder saved by transformers' save_pretrained") from e
    q = hf_cfg.qformer_config
    qcfg = QFormerConfig(bert_name=name, bert_weights="random", hidden_size=q.hidden_size,
                         num_layers=q.num_hidden_layers, num_heads=q.num_attention_heads,
                         intermediate_size=q.intermediate_size, num_queries=hf_cfg.num_query_tokens,
                         cross_attention_freq=q.cross_attention_frequency, vision_width=q.encoder_hidden_size,
                         embed_dim=getattr(hf_cfg, "image_text_hidden_size", 256), vocab_size=q.vocab_size,
                         pad_token_id=q.pad_token_id or 0, dec_token_id=min(30522, q.vocab_size - 1),
                         max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
                         dropout=0.0)
    encoder = freeze(HFVisionEncoder(hf.vision_model, hf_cfg.vision_config.image_size))
    dev = _device(device)
    blip = Blip2(device=dev, batch_size=batch_size, amp=amp, source=name)
    if retrieval:
        model = Stage1Model(qcfg)
        load_hf_retrieval(model, hf.state_dict())
        blip.retriever, blip.tokenizer, blip.encoders["retriever"] = model.to(dev).eval(), tokenizer, encoder.to(dev)
    else:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = Stage2Model(qcfg, hf.language_model, tokenizer, prompt="")  # BLIP-2 captions with no text prompt
        load_hf_blip2_generation(model, hf.state_dict())
        blip.captioner, blip.encoders["captioner"] = model.to(dev).eval(), encoder.to(dev)
    return blip
