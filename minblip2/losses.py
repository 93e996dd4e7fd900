"""The three stage-1 losses: ITC, ITM (with hard negatives) and ITG; and query_similarity, the cpu preset's fourth.

They work on a batch that may be split across processes: similarities are computed against the
features of the GLOBAL batch (gathered from every process), so in-batch negatives grow with the number
of GPUs. In one process the gathers are no-ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dist


def itc_similarities(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Image-text similarity = the MAX over queries of query . text.

    image_feats (Bi, Q, E) and text_feats (Bt, E), both L2-normalised -> (Bi, Bt) cosine similarities.
    The max lets each text pick the query that describes it best.
    """
    return torch.einsum("iqe,te->iqt", image_feats, text_feats).amax(dim=1)


def itc_loss(image_feats, text_feats, temp, label_smoothing: float = 0.0, gather_grad: bool = True,
             image_ids=None, image_ids_all=None):
    """Image-text contrastive loss, both directions, against the global batch.

    image_feats (B, Q, E), text_feats (B, E): this process's normalised features.
    temp: the (learnable) temperature; logits are similarities DIVIDED by it.
    image_ids (B,): with them, every pair of the same image is a positive and the target is spread evenly over
    them (LAVIS); image_ids_all (W*B,) are the global batch's (gathered here if not given).
    Returns (loss, sim_i2t (B, W*B), sim_t2i (B, W*B)), the logits of this process's rows.
    """
    gather = dist.all_gather_with_grad if gather_grad else dist.all_gather_no_grad
    image_all, text_all = gather(image_feats), gather(text_feats)  # (W*B, Q, E), (W*B, E)
    sim_i2t = itc_similarities(image_feats, text_all) / temp  # (B, W*B)
    sim_t2i = itc_similarities(image_all, text_feats).t() / temp  # (B, W*B)
    targets = itc_targets(image_feats.shape[0], image_feats.device, image_ids, image_ids_all)
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
    return loss, sim_i2t, sim_t2i


def itc_targets(B: int, device, image_ids=None, image_ids_all=None) -> torch.Tensor:
    """ITC's targets for this process's B rows against the global batch: without ids, the class index of each
    row's own pair (the positives sit on the "diagonal"); with ids, probabilities spread evenly over every pair
    of the same image -- one-hot when every image of the global batch is distinct."""
    if image_ids is None:
        return torch.arange(B, device=device) + dist.rank() * B
    # one image often comes twice in a batch (5 captions each, cached views): its other caption is a positive
    # too, so a one-hot target would push apart what belongs together
    if image_ids_all is None:
        image_ids_all = dist.all_gather_no_grad(image_ids)
    same = (image_ids.view(-1, 1) == image_ids_all.view(1, -1)).float()  # (B, W*B), diagonal included
    return same / same.sum(dim=1, keepdim=True)


def query_similarity(queries: torch.Tensor) -> torch.Tensor:
    """How much an image's query outputs say the same thing: the mean SQUARED cosine between two different queries
    of one image, averaged over the batch. 1 when the Q queries are one vector (or its negative) Q times, 0 when
    they are orthogonal, ~1/H for random directions in H dimensions.

    queries (B, Q, H): the Q-Former's query outputs (what stage 2 hands the LLM). Not one of the paper's losses: the
    cpu preset adds it with weight 1 (Stage1Config.query_sim_weight; README, "Deviations"), the paper preset does
    not. ITC, ITM and ITG end at the same values whether the queries stay apart or collapse into one vector, and
    stage 2 needs them apart. Why squared, per image: a signed mean cosine can be met without diversity (8 queries
    at +v and 8 at -v have mean cosine -1/15, two directions, no more), and a batch mean clamped at 0 gives a
    collapsed image no gradient when the others sit below 0; squared, every image is pushed on its own and +v/-v is
    counted as the collapse it is. Give it queries computed without dropout (Stage1Model does): on a training pass,
    dropout noise alone can lower it.
    """
    Q = queries.shape[1]
    if Q < 2:
        return queries.new_zeros(())
    q = F.normalize(queries.float(), dim=-1)
    g = q @ q.transpose(1, 2)  # (B, Q, Q) cosines; the diagonal is 1
    off_diagonal = (g.pow(2).sum(dim=(1, 2)) - Q) / (Q * (Q - 1))  # (B,): per image
    return off_diagonal.mean()


def query_effective_rank(queries: torch.Tensor) -> torch.Tensor:
    """The number of directions an image's queries really use, averaged over the batch: exp(entropy) of the
    normalised singular values of its unit-length query outputs (Roy & Vetterli's effective rank). 1 = one
    direction (collapse, +v/-v included), Q = Q equally strong orthogonal directions. queries (B, Q, H) -> ()."""
    q = F.normalize(queries.detach().float(), dim=-1)
    s = torch.linalg.svdvals(q)  # (B, min(Q, H))
    p = s / s.sum(dim=1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    return entropy.exp().mean()


@torch.no_grad()
def sample_hard_negatives(sim_i2t, sim_t2i, image_ids=None, image_ids_all=None, generator=None,
                          every_process: bool = False):
    """For each pair, sample one hard-negative text and one hard-negative image.

    Negatives are drawn from softmax(similarity) over the global batch, so texts/images the model finds
    confusingly similar are picked more often. The positive (the diagonal) is never drawn; with image ids,
    no other caption of the same image is drawn either (those are positives too, not negatives).
    sim_i2t, sim_t2i: (B, W*B) logits. Returns (neg_text_idx (B,), neg_image_idx (B,)) into the global batch;
    every_process=True: (W*B,) each, every process's rows (so a process knows which of its images the others need).

    With several processes every process gathers the whole (W*B, W*B) similarity matrices and samples ALL rows,
    then keeps its own: with a `generator` seeded alike everywhere (train.py seeds one per step), the negatives
    are those one process with the whole batch would draw, whatever the number of processes.
    """
    B = sim_i2t.shape[0]
    offset = dist.rank() * B
    if dist.world_size() > 1:
        sim_i2t, sim_t2i = dist.all_gather_no_grad(sim_i2t), dist.all_gather_no_grad(sim_t2i)
        image_ids = image_ids_all
    N = sim_i2t.shape[0]
    positive = torch.eye(N, dtype=torch.bool, device=sim_i2t.device)
    if image_ids is not None:
        positive |= image_ids.view(-1, 1) == image_ids_all.view(1, -1)
    if positive.all(dim=1).any():
        raise ValueError(
            "ITM needs a negative for every pair, but some pair has none: the global batch holds "
            f"{N} pair(s), all of the same image. Use a batch size of at least 2 with different images "
            "(or train without ITM: losses=('itc','itg')).")
    weights_i2t = F.softmax(sim_i2t.float().masked_fill(positive, float("-inf")), dim=1)
    weights_t2i = F.softmax(sim_t2i.float().masked_fill(positive, float("-inf")), dim=1)
    neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    if every_process:
        return neg_text, neg_image
    return neg_text[offset:offset + B], neg_image[offset:offset + B]


def itm_loss(itm_logits: torch.Tensor, num_pos: int) -> torch.Tensor:
    """ITM: a 2-way classification. itm_logits (3B, 2) for [positives | (neg image, text) | (image, neg text)]."""
    labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
    labels[:num_pos] = 1
    return F.cross_entropy(itm_logits, labels)


def itg_loss(logits, input_ids, text_mask, label_smoothing: float = 0.0):
    """Image-grounded text generation: predict token t+1 from tokens <= t (and the queries).

    logits (B, T, V) at every text position, input_ids/text_mask (B, T). Pads are not predicted.
    The mean is over the target tokens of the GLOBAL batch: each process divides its sum by the mean
    token count per process, so DDP's gradient average equals one process with the whole batch even
    when processes hold captions of different lengths (a per-process mean would weight them unequally).
    """
    labels = input_ids.masked_fill(text_mask == 0, -100)[:, 1:]
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")
    num_tokens = dist.all_reduce_mean((labels != -100).sum().float())  # one process: its own token count
    return total / num_tokens
