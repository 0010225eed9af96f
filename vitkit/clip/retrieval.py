"""Image-text retrieval: recall@k both ways from embeddings, and the evaluator that collects them.

Image -> text: an image's query is a hit at k when ANY of its captions is among the k texts most
similar to it. Text -> image: a caption's query is a hit when its own image is among the k most
similar images. Similarity is the cosine. Exact ties are scored by their expectation: the recall a
random order of the tied items would give on average, so a model whose embeddings all coincide
scores chance (k / N), neither 0 nor 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.distributed import all_gather_object, is_dist
from ..engine.evaluators import Evaluator
from ..errors import DataError

_CHUNK = 2048  # query rows scored at a time: bounds the (rows, candidates) score matrix


def _expected_hits(above: Tensor, tied_neg: Tensor, tied_pos: Tensor, k: int) -> Tensor:
    """P(a positive is in the top k) when ``above`` negatives score higher than the best positive and the
    ``tied_neg`` negatives and ``tied_pos`` positives that score exactly as high are in random order."""
    slots = (k - above).clamp_min(0)  # places left in the top k when the tied group starts
    # The first `slots` of the tied group are all negatives with probability prod_i (n - i) / (n + p - i).
    miss = torch.ones_like(above, dtype=torch.float64)
    n, p = tied_neg.double(), tied_pos.double()
    for i in range(k):
        step = ((n - i).clamp_min(0) / (n + p - i).clamp_min(1)).where(slots > i, torch.ones_like(miss))
        miss = miss * step
    return 1.0 - miss


def _recalls(scores: Tensor, positive: Tensor, ks) -> Tensor:
    """(Q, C) scores of Q queries against C candidates, ``positive`` (Q, C) bool -> (len(ks), Q) expected hits.
    A NaN score (a non-finite embedding) ranks last: it must never count as a hit."""
    scores = scores.nan_to_num(nan=float("-inf"))
    best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
    above = ((scores > best) & ~positive).sum(1)
    tied_neg = ((scores == best) & ~positive).sum(1)
    tied_pos = ((scores == best) & positive).sum(1)
    return torch.stack([_expected_hits(above, tied_neg, tied_pos, k) for k in ks])


def retrieval_metrics(
    image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor, ks=(1, 5, 10)
) -> dict[str, float]:
    """Recall@k of image->text and text->image retrieval.

    Args:
        image_embeds: (N, E) one row per image.
        text_embeds: (M, E) one row per caption (normalised or not: scored by cosine similarity).
        text_to_image: (M,) int64, the image (row of ``image_embeds``) each caption describes.
        ks: the cut-offs.

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "r_mean"}``: fractions in [0, 1] (recall of
        image->text over the images that have at least one caption, of text->image over the captions),
        ``r_mean`` their mean.
    """
    img = F.normalize(image_embeds.detach().float(), dim=-1)
    txt = F.normalize(text_embeds.detach().float(), dim=-1)
    owner = text_to_image.to(device=img.device, dtype=torch.long).flatten()
    n, m = img.shape[0], txt.shape[0]
    if owner.shape[0] != m:
        raise DataError(f"text_to_image has {owner.shape[0]} entries for {m} texts: give one image index per text")
    if n == 0 or m == 0:
        raise DataError(f"retrieval needs images and captions, got {n} images and {m} captions")
    if owner.min() < 0 or owner.max() >= n:
        raise DataError(f"text_to_image holds image index {int(owner.max() if owner.max() >= n else owner.min())}, "
                        f"outside the {n} images 0..{n - 1}")
    ks = tuple(int(k) for k in ks)
    i2t, t2i = [], []
    for s in range(0, n, _CHUNK):
        rows = torch.arange(s, min(s + _CHUNK, n), device=img.device)
        i2t.append(_recalls(img[rows] @ txt.T, owner[None, :] == rows[:, None], ks))
    has_caption = torch.bincount(owner, minlength=n) > 0
    i2t = torch.cat(i2t, dim=1)[:, has_caption]
    cols = torch.arange(n, device=img.device)
    for s in range(0, m, _CHUNK):
        part = owner[s:s + _CHUNK]
        t2i.append(_recalls(txt[s:s + _CHUNK] @ img.T, cols[None, :] == part[:, None], ks))
    t2i = torch.cat(t2i, dim=1)
    out = {f"i2t_r{k}": i2t[i].mean().item() for i, k in enumerate(ks)}
    out.update({f"t2i_r{k}": t2i[i].mean().item() for i, k in enumerate(ks)})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def _as_ids(value, n: int) -> list | None:
    if value is None:
        return None
    ids = value.tolist() if isinstance(value, Tensor) else list(value)
    return ids if len(ids) == n else None


class RetrievalEvaluator(Evaluator):
    """Recall@k both ways over a validation set (primary ``r_mean``, the mean of the recalls; higher is better).

    ``update(batch, outputs)`` reads the objective's ``outputs``: ``image_embeds`` (B, E),
    ``text_embeds`` (M, E) and ``text_to_image`` (M,) (the batch row each text describes); with
    ``batch["image_id"]`` an image seen twice (a sampler padding its last shard) counts once.
    ``compute()`` gathers every process's embeddings and scores them together.
    """

    primary = "r_mean"
    higher_is_better = True

    def __init__(self, ks=(1, 5, 10)):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self.images: list[Tensor] = []
        self.texts: list[Tensor] = []
        self.owners: list[Tensor] = []
        self.ids: list | None = []

    def update(self, batch: dict, outputs: dict) -> None:
        img = outputs["image_embeds"].detach().float().cpu()
        txt = outputs["text_embeds"].detach().float().cpu()
        owner = outputs.get("text_to_image")
        owner = torch.arange(img.shape[0]) if owner is None else owner.detach().long().cpu()
        if owner.shape[0] != txt.shape[0]:
            raise DataError(f"text_to_image has {owner.shape[0]} entries for {txt.shape[0]} texts")
        ids = _as_ids(batch.get("image_id"), img.shape[0])
        self.ids = self.ids + ids if self.ids is not None and ids is not None else None
        self.images.append(img)
        self.texts.append(txt)
        self.owners.append(owner)

    def _local(self) -> tuple[Tensor, Tensor, Tensor, list | None]:
        if not self.images:
            return torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), self.ids
        owners, base = [], 0
        for img, owner in zip(self.images, self.owners):
            owners.append(owner + base)
            base += img.shape[0]
        return torch.cat(self.images), torch.cat(self.texts), torch.cat(owners), self.ids

    def compute(self) -> dict[str, float]:
        parts = all_gather_object(self._local()) if is_dist() else [self._local()]
        images, texts, owners, ids, base = [], [], [], [], 0
        for img, txt, owner, part_ids in parts:
            if img.shape[0] == 0:
                continue
            images.append(img)
            texts.append(txt)
            owners.append(owner + base)
            base += img.shape[0]
            ids = ids + part_ids if ids is not None and part_ids is not None else None
        if not images:
            return {}
        img, txt, owner = torch.cat(images), torch.cat(texts), torch.cat(owners)
        if ids is not None:
            img, txt, owner = _drop_repeats(img, txt, owner, ids)
        return retrieval_metrics(img, txt, owner, self.ks)


def _drop_repeats(img: Tensor, txt: Tensor, owner: Tensor, ids: list) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the first copy of each image id and the captions of that copy."""
    first: dict = {}
    keep = [first.setdefault(i, row) == row for row, i in enumerate(ids)]
    if all(keep):
        return img, txt, owner
    keep_t = torch.tensor(keep)
    new_index = torch.cumsum(keep_t.long(), 0) - 1
    texts = keep_t[owner]
    return img[keep_t], txt[texts], new_index[owner[texts]]
