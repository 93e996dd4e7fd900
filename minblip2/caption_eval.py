"""Captioning metrics: the COCO caption evaluation (pycocoevalcap), quietly and with clear errors.

BLEU-1..4, METEOR, ROUGE-L and CIDEr, x100, after the Stanford PTB tokenizer (lower-case, punctuation
removed) -- the protocol of the COCO server, LAVIS and the paper. SPICE is NOT computed: it needs Stanford
CoreNLP models that pycocoevalcap downloads on first use, impossible offline. PTB tokenisation and METEOR
run Java (any JRE >= 8).
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tempfile
import threading
from pathlib import Path

# what pycocoevalcap's PTBTokenizer removes after tokenising
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x85\u2028\u2029"})


def _java_error(what: str, err: Exception | str) -> RuntimeError:
    return RuntimeError(f"{what} needs Java: install a JRE (e.g. `apt-get install default-jre-headless` or "
                        f"`conda install openjdk`) and make sure `java` is on PATH ({err})")


def ptb_tokenize(sentences: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer, one string per sentence, without its temp file inside site-packages and its
    stderr chatter. Empty sentences stay empty (they never reach Java, whose line handling would drop them)."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    clean = [s.translate(_LINE_BREAKS).strip() for s in sentences]
    todo = [i for i, s in enumerate(clean) if s]
    out = [""] * len(clean)
    if not todo:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(clean[i] for i in todo))
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               "-encoding", "utf-8", path]
        try:
            res = subprocess.run(cmd, capture_output=True)
        except FileNotFoundError as e:
            raise _java_error("PTB tokenisation", e) from None
    if res.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer failed (exit {res.returncode}): {res.stderr.decode(errors='replace')[-500:]}")
    lines = res.stdout.decode("utf-8").split("\n")
    if len(lines) < len(todo):
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(todo)} sentences")
    for i, line in zip(todo, lines):
        out[i] = " ".join(w for w in line.split() if w not in PUNCTUATIONS)
    return out


def caption_metrics(predictions: dict, references: dict[object, list[str]], bleu_all: bool = False,
                    meteor: bool = True) -> dict[str, float]:
    """predictions {image_id: caption}, references {image_id: [captions]} -> {BLEU_4, METEOR, ROUGE_L, CIDEr} x100
    (plus BLEU_1..3 with bleu_all; without METEOR with meteor=False: its Java start-up alone takes ~5 s).
    Scored over the images in `predictions`; each needs >= 1 reference.

    CIDEr's idf comes from the references of the evaluated images, so it depends on the evaluated set (as on the
    COCO server): compare CIDEr only between runs on the same images.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(predictions)
    if not ids:
        raise ValueError("no predictions to score")
    absent = [i for i in ids if not references.get(i)]
    if absent:
        raise KeyError(f"{len(absent)} predicted image(s) have no references, e.g. {absent[:3]}")
    flat = [predictions[i] or "" for i in ids] + [r for i in ids for r in references[i]]
    tokens = iter(ptb_tokenize(flat))
    res = {k: [next(tokens)] for k in range(len(ids))}  # integer keys: pycocoevalcap only needs them hashable
    gts = {k: [next(tokens) for _ in references[i]] for k, i in enumerate(ids)}

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratios
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4) if bleu_all else [3]:
        out[f"BLEU_{n + 1}"] = bleu[n] * 100
    if meteor:
        out["METEOR"] = _meteor(gts, res)
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0] * 100
    out["CIDEr"] = Cider().compute_score(gts, res)[0] * 100
    return {k: float(v) for k, v in out.items()}


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()  # a Java process that loads its paraphrase tables
    except FileNotFoundError as e:
        raise _java_error("METEOR", e) from None
    try:
        return scorer.compute_score(gts, {k: [v[0].replace("|||", "")] for k, v in res.items()})[0] * 100
    except ValueError as e:  # the jar died (e.g. too little memory for its -Xmx2G) and answered nothing
        scorer.lock = threading.Lock()  # compute_score left its lock held: __del__ would wait for it forever
        err = scorer.meteor_p.stderr.read().decode(errors="replace")[-500:] if scorer.meteor_p.poll() is not None else ""
        raise RuntimeError(f"METEOR failed: {e} {err}") from None
    finally:
        del scorer  # its __del__ kills the Java process
