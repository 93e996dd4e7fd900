"""The diagnostics behind docs/recipe.md's "why" (minblip2/tools/diagnostics.py): each on a case whose answer is known."""
import math

import torch

from minblip2.config import QFormerConfig
from minblip2.tools.diagnostics import (cross_attention_stats, image_use, query_cos_by_layer, query_stats,
                                       stage1_query_stats)
from minblip2.qformer import QFormer

from test_stage2 import TINY


def test_query_stats_on_known_cases():
    torch.manual_seed(0)
    one = torch.randn(5, 1, 8).expand(5, 4, 8)  # every image: one vector repeated by 4 queries
    s = query_stats(one)
    assert abs(s["query_cos"] - 1.0) < 1e-6 and s["image_specific_energy"] > 0.5
    same = torch.randn(1, 4, 8).expand(5, 4, 8)  # every image gets the same queries
    s = query_stats(same)
    assert s["image_specific_energy"] < 1e-6 and abs(s["image_cos"] - 1.0) < 1e-6
    orth = torch.eye(4).expand(3, 4, 4) + 0.0  # orthogonal queries
    assert abs(query_stats(orth)["query_cos"]) < 1e-6


def test_cross_attention_stats_uniform_and_focused():
    torch.manual_seed(0)
    qf = QFormer(QFormerConfig(**TINY), with_text=False)
    x = torch.randn(2, 5, TINY["vision_width"])
    with torch.no_grad():
        for layer in qf.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.query.weight.zero_()  # all logits 0: uniform attention
                layer.cross_attn.query.bias.zero_()
    stats = cross_attention_stats(qf, x)
    assert len(stats) == 1  # 2 layers, cross-attention every 2nd
    assert abs(stats[0]["entropy"] - math.log(5)) < 0.01 and abs(stats[0]["cls_weight"] - 0.2) < 1e-3
    x[:, 0] = 0.0  # token 0's key is the key bias alone; make its logit huge for every query
    with torch.no_grad():
        for layer in qf.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.query.bias.fill_(1.0)
                layer.cross_attn.key.weight.zero_()
                layer.cross_attn.key.bias.fill_(0.0)
                layer.cross_attn.key.weight[:, 0] = -100.0  # tokens 1..4 get a very negative logit via feature 0
        x[:, 1:, 0] = 1.0
    stats = cross_attention_stats(qf, x)
    assert stats[0]["cls_weight"] > 0.99 and stats[0]["entropy"] < 0.05
    assert qf.training  # the helper restores the mode it found


def test_query_cos_by_layer_finds_the_sublayer_that_makes_queries_alike():
    torch.manual_seed(0)
    qf = QFormer(QFormerConfig(**TINY), with_text=False)
    x = torch.randn(3, 5, TINY["vision_width"])
    rows = query_cos_by_layer(qf, x)
    assert [r["sublayer"] for r in rows] == ["L0.self", "L0.cross", "L0.ffn", "L1.self", "L1.ffn"]
    assert all(r["query_cos"] < 0.5 for r in rows)  # a random Q-Former keeps its queries apart
    with torch.no_grad():  # layer 1's self-attention adds one large vector to every query
        qf.layers[1].self_attn.out.weight.zero_()
        qf.layers[1].self_attn.out.bias.copy_(100 * torch.randn(TINY["hidden_size"]))
    rows = {r["sublayer"]: r for r in query_cos_by_layer(qf, x)}
    assert rows["L0.ffn"]["query_cos"] < 0.5  # before it: apart
    assert rows["L1.self"]["query_cos"] > 0.99 and rows["L1.self"]["added_cos"] > 0.999
    assert rows["L1.self"]["added"] > 10 * rows["L0.self"]["added"]
    assert qf.training


class MatchModel(torch.nn.Module):
    """A stand-in stage-2 model that knows each caption's image: loss 0 for its own image, 2 for any other."""

    def __init__(self, feats, captions):
        super().__init__()
        self.own = dict(zip(captions, feats))

    def forward(self, feats, captions):
        wrong = [0.0 if torch.equal(f, self.own[c]) else 2.0 for f, c in zip(feats, captions)]
        return {"loss": torch.tensor(sum(wrong) / len(wrong))}


def test_image_use_pairs_each_caption_with_another_image():
    feats = torch.randn(5, 3, 4)
    caps = [f"caption {i}" for i in range(5)]
    m = MatchModel(feats, caps).train()
    use = image_use(m, feats, caps, batch_size=2)  # uneven last batch: per-caption mean, not per-batch
    assert use == {"matched": 0.0, "shuffled": 2.0, "gap": 2.0}
    assert m.training  # the mode it found
    blind = image_use(MatchModel(torch.zeros(5, 3, 4), caps), feats, caps)  # never sees its images
    assert blind["gap"] == 0.0


def test_stage1_query_stats_reads_the_query_outputs_without_dropout():
    from minblip2.stage1 import Stage1Model

    torch.manual_seed(0)
    m = Stage1Model(QFormerConfig(**TINY)).train()  # dropout on: the helper must switch it off
    x = torch.randn(3, 5, TINY["vision_width"])
    got = stage1_query_stats(m, x)
    assert not m.training and got == stage1_query_stats(m, x)  # eval mode: deterministic
    assert got == query_stats(m.encode_image(x)[1])
