"""A LLaVA-style connector: image features from a frozen encoder, projected into a causal LM's embeddings.

LLaVA (Liu et al., 2023) takes the patch tokens of the second-to-last layer of a frozen CLIP
image tower (the class token dropped), maps them with a projector (a linear map in LLaVA, a
2-layer MLP with GELU in LLaVA-1.5) to the width of the LM's token embeddings, and puts them
where the ``<image>`` token stands in the text (in front of the text when it has none). Stage 1
trains only the projector on captions, the encoder and the LM frozen; the loss counts the text
tokens only.

The image encoder is any vitkit backbone (features through ``forward_intermediates``) or a
two-tower CLIP model (``image_features``). The LM is any Hugging Face causal LM
(``get_input_embeddings()``, ``forward(inputs_embeds=, attention_mask=)`` returning ``logits``);
vitkit builds none: the caller passes it in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..layers import get_act_layer

IGNORE_INDEX = -100  # the label Hugging Face's and PyTorch's cross entropy skip


class Projector(nn.Module):
    """The connector: ``layers`` linear maps with an activation between them (keys ``fc1``, ``fc2``, ...).

    ``layers=2`` is LLaVA-1.5's ``mlp2x_gelu`` (Linear-GELU-Linear, hidden width = ``out_dim``
    unless ``hidden`` is given); ``layers=1`` is the original LLaVA's single linear map.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, layers: int = 2, act_layer: str = "gelu"):
        super().__init__()
        if layers < 1:
            raise ConfigError(f"the projector needs at least 1 layer, got layers={layers}")
        hidden = out_dim if hidden is None else hidden
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.num_layers = layers
        for i in range(layers):
            self.add_module(f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.act = get_act_layer(act_layer)()

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.num_layers):
            if i:
                x = self.act(x)
            x = getattr(self, f"fc{i + 1}")(x)
        return x


def _tower(encoder: nn.Module) -> nn.Module:
    """The image backbone of ``encoder`` (a two-tower model's ``visual``, else the encoder itself)."""
    return encoder.visual if hasattr(encoder, "image_features") and hasattr(encoder, "visual") else encoder


def feature_dim(encoder: nn.Module, layer: int) -> int:
    """Channels of the features :func:`image_features` takes at ``layer``."""
    tower = _tower(encoder)
    info = getattr(tower, "feature_info", None)
    if info:
        n = len(info)
        if not -n <= layer < n:
            raise ConfigError(
                f"layer={layer} is out of range: the image encoder has {n} feature points "
                f"(layer in {-n}..{n - 1}; -2 is the second-to-last block)"
            )
        return int(info[layer]["num_chs"])
    dim = getattr(tower, "num_features", None)
    if dim is None:
        raise ConfigError(f"{type(tower).__name__} declares neither feature_info nor num_features: "
                          "use a vitkit backbone or a two-tower model as the image encoder")
    return int(dim)


def image_features(encoder: nn.Module, images: Tensor, layer: int = -2, drop_prefix: bool = True) -> Tensor:
    """(B, N, C) tokens of ``encoder`` after feature point ``layer`` (a ViT: block ``layer``).

    Without the final norm, as LLaVA takes CLIP's hidden state. ``drop_prefix`` removes the class
    and register tokens; a hierarchical backbone's stage maps have none.
    """
    fn = getattr(encoder, "image_features", None)
    if callable(fn):
        return fn(images, layer=layer, drop_prefix=drop_prefix)
    if not callable(getattr(encoder, "forward_intermediates", None)):
        raise ConfigError(f"{type(encoder).__name__} cannot be an image encoder: it has neither image_features() "
                          "(a two-tower model) nor forward_intermediates() (a vitkit backbone)")
    feature_dim(encoder, layer)  # range check with a clear message
    if drop_prefix:
        return encoder.forward_intermediates(images, [layer], output_fmt="NLC", intermediates_only=True)[0]
    try:
        x, prefix = encoder.forward_intermediates(
            images, [layer], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)[0]
    except ValueError:  # a stage map: no prefix tokens to keep
        return encoder.forward_intermediates(images, [layer], output_fmt="NLC", intermediates_only=True)[0]
    return torch.cat([prefix, x], dim=1)


def tokenize_captions(tokenizer: Callable, captions: list[str], context_length: int | None = None) -> dict[str, Tensor]:
    """Captions -> ``input_ids``, ``attention_mask`` and ``labels`` (B, L) for the LM.

    ``tokenizer`` follows vitkit's tokenizer interface (``tokenizer(texts, context_length)`` ->
    (N, L) ids padded after the end-of-text token ``eot_id``). A token is real up to and
    including the first end-of-text (so a padding id that is also a word id does no harm).
    The first position is never a label: it is the given start of the text (the start-of-text
    token), so an image-blind LM and the connector are scored on the same tokens.
    """
    if isinstance(captions, str):
        captions = [captions]
    if not captions or not all(isinstance(c, str) for c in captions):
        raise DataError("tokenize_captions needs a non-empty list of caption strings")
    ids = tokenizer(list(captions), context_length) if context_length is not None else tokenizer(list(captions))
    ids = torch.as_tensor(ids, dtype=torch.long)
    eot = getattr(tokenizer, "eot_id", None)
    if eot is None:
        raise ConfigError(f"{type(tokenizer).__name__} has no eot_id: captions need an end-of-text token")
    is_eot = ids == eot
    mask = (is_eot.long().cumsum(1) - is_eot.long()) == 0  # nothing counts after the first end-of-text
    labels = ids.masked_fill(~mask, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


def caption_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood of the labelled tokens and their count.

    Position t predicts label t+1 (the causal LM shift); positions labelled ``-100`` (image
    tokens, padding, the start token) are skipped.
    """
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (target != IGNORE_INDEX).sum()


class VisionLanguageModel(nn.Module):
    """An image encoder and a causal LM joined by a :class:`Projector` (LLaVA).

    Args:
        image_encoder: a vitkit backbone (built with ``num_classes=0`` or not: only its features are
            used) or a two-tower model (``TwoTower``).
        lm: a Hugging Face causal LM (``PreTrainedModel``; ``get_input_embeddings()``).
        layer: the encoder's feature point whose tokens become image tokens (-2: the
            second-to-last block, LLaVA's choice).
        drop_prefix: drop the class/register tokens (LLaVA keeps the patch tokens only).
        freeze_encoder, freeze_lm: keep them frozen (no gradients, eval mode); LLaVA's stage 1
            trains the projector only.
        image_token: the text token the image tokens replace (an id, or a string looked up in
            ``tokenizer``); captions without it get the image in front.
        tokenizer: turns captions into ids for :meth:`tokenize` (vitkit's tokenizer interface).
        context_length: the caption length the tokenizer pads or truncates to (None: its own).
        projector_hidden, projector_layers: see :class:`Projector`.
    """

    def __init__(self, image_encoder: nn.Module, lm: nn.Module, *, layer: int = -2, drop_prefix: bool = True,
                 freeze_encoder: bool = True, freeze_lm: bool = True, image_token: str | int | None = "<image>",
                 tokenizer: Callable | None = None, context_length: int | None = None,
                 projector_hidden: int | None = None, projector_layers: int = 2):
        super().__init__()
        get_emb = getattr(lm, "get_input_embeddings", None)
        if not callable(get_emb):
            raise ConfigError(f"the language model must be a Hugging Face causal LM (get_input_embeddings()); "
                              f"got {type(lm).__name__}")
        self.image_encoder = image_encoder
        self.lm = lm
        self.layer, self.drop_prefix = layer, drop_prefix
        self.freeze_encoder, self.freeze_lm = freeze_encoder, freeze_lm
        self.projector = Projector(feature_dim(image_encoder, layer), get_emb().embedding_dim,
                                   projector_hidden, projector_layers)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.image_token_id = self._token_id(image_token, tokenizer)
        if freeze_encoder:
            image_encoder.requires_grad_(False)
        if freeze_lm:
            lm.requires_grad_(False)
        self.train()

    @staticmethod
    def _token_id(token, tokenizer) -> int | None:
        if token is None or isinstance(token, int):
            return token
        for name in ("token_to_id", "convert_tokens_to_ids"):
            fn = getattr(tokenizer, name, None)
            if callable(fn):
                tid = fn(token)
                unk = getattr(tokenizer, "unk_token_id", None)
                if tid is not None and tid != unk:
                    return int(tid)
        return None  # the tokenizer cannot spell it: the image always goes in front

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.image_encoder.eval()
        if self.freeze_lm:
            self.lm.eval()
        return self

    # ------------------------------------------------------------------ pieces
    def features(self, images: Tensor) -> Tensor:
        """(B, N, C) encoder features of ``images`` (before the projector; see :func:`image_features`)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return image_features(self.image_encoder, images, self.layer, self.drop_prefix)

    def encode_images(self, images: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """(B, N, D) image tokens in the LM's embedding space, from images or precomputed encoder ``features``."""
        if features is None:
            features = self.features(images)
        dtype = self.lm.get_input_embeddings().weight.dtype
        return self.projector(features.to(self.projector.fc1.weight.dtype)).to(dtype)

    def tokenize(self, captions: list[str]) -> dict[str, Tensor]:
        """Captions -> ``input_ids``, ``attention_mask``, ``labels`` (see :func:`tokenize_captions`)."""
        if self.tokenizer is None:
            raise ConfigError("this VisionLanguageModel has no tokenizer: pass tokenizer= (the LM's), "
                              "or give the batch input_ids")
        return tokenize_captions(self.tokenizer, captions, self.context_length)

    def splice(self, image_embeds: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None,
               labels: Tensor | None = None) -> dict[str, Tensor]:
        """The LM's input: text embeddings with the image tokens put in.

        Each row's image tokens replace its one ``image_token_id`` (all rows have one, or none:
        then they go in front). Returns ``inputs_embeds`` (B, T, D), ``attention_mask`` and
        ``labels`` (B, T; image positions ``-100``), and ``image_mask`` (B, T) True at image tokens.
        """
        B, L = input_ids.shape
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None
                          else attention_mask.to(input_ids.device, torch.long))
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        at_token = (input_ids == self.image_token_id) if self.image_token_id is not None else None
        ids = input_ids.masked_fill(at_token, 0) if at_token is not None else input_ids
        text = self.lm.get_input_embeddings()(ids)
        if at_token is not None:
            labels = labels.masked_fill(at_token, IGNORE_INDEX)
        if image_embeds is None or image_embeds.shape[1] == 0:
            return {"inputs_embeds": text, "attention_mask": attention_mask, "labels": labels,
                    "image_mask": torch.zeros_like(input_ids, dtype=torch.bool)}
        if image_embeds.shape[0] != B:
            raise DataError(f"{image_embeds.shape[0]} images for {B} captions: give one image per caption")
        K = image_embeds.shape[1]
        counts = at_token.sum(1) if at_token is not None else torch.zeros(B, dtype=torch.long, device=ids.device)
        if bool((counts == 0).all()):
            at, drop = torch.zeros(B, dtype=torch.long, device=ids.device), 0
        elif bool((counts == 1).all()):
            at, drop = at_token.long().argmax(1), 1
        else:
            raise DataError(f"each caption must hold exactly one image token (id {self.image_token_id}) or none "
                            f"at all; the rows hold {counts.tolist()}")
        T = L - drop + K
        j = torch.arange(T, device=ids.device).unsqueeze(0)
        a = at.unsqueeze(1)
        is_image = (j >= a) & (j < a + K)
        src = torch.where(j < a, j, j - K + drop).clamp(0, L - 1)  # text position each slot copies
        img_src = (j - a).clamp(0, max(K - 1, 0))
        D = text.shape[-1]
        embeds = torch.where(is_image.unsqueeze(-1), image_embeds.to(text.dtype).gather(1, img_src.unsqueeze(-1).expand(B, T, D)),
                             text.gather(1, src.unsqueeze(-1).expand(B, T, D)))
        mask = torch.where(is_image, torch.ones_like(src), attention_mask.gather(1, src))
        labels = torch.where(is_image, torch.full_like(src, IGNORE_INDEX), labels.gather(1, src))
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels, "image_mask": is_image}

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, *, features: Tensor | None = None) -> dict[str, Tensor]:
        """``{"loss", "logits", "labels", "nll_sum", "n_tokens"}``; ``images=None`` (and no
        ``features``) runs the LM alone, image-blind.

        ``loss`` is the mean next-token cross entropy over the caption tokens (``labels`` not
        ``-100``; None: every real token), never over image tokens or padding.
        """
        image_embeds = None if images is None and features is None else self.encode_images(images, features)
        s = self.splice(image_embeds, input_ids, attention_mask, labels)
        out = self.lm(inputs_embeds=s["inputs_embeds"], attention_mask=s["attention_mask"], use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        nll, n = caption_nll(logits, s["labels"])
        return {"loss": nll / n.clamp(min=1), "logits": logits, "labels": s["labels"], "nll_sum": nll, "n_tokens": n}

    def batch_inputs(self, batch: dict, device: torch.device | None = None) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` of a batch: its own, or its ``caption`` strings tokenized."""
        if "input_ids" in batch:
            ids = batch["input_ids"]
            text = {"input_ids": ids, "attention_mask": batch.get("attention_mask"), "labels": batch.get("labels")}
        elif "caption" in batch:
            text = self.tokenize(batch["caption"])
        else:
            raise DataError(f"a caption batch needs 'caption' (list of str) or 'input_ids'; it has {sorted(batch)}")
        device = device or self.projector.fc1.weight.device
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in text.items()}


@torch.no_grad()
def caption_perplexity(model: VisionLanguageModel, loader: Iterable[dict], *, use_images: bool = True,
                       transform: Callable[[dict], dict] | None = None, all_captions: bool = True,
                       max_batches: int | None = None) -> float:
    """exp(mean negative log-likelihood per caption token) over ``loader``'s batches.

    Batches hold ``image`` (normalised, or raw when ``transform`` normalises) or ``features``
    (precomputed encoder features), and ``caption`` (list of str) or ``input_ids``. With
    ``all_captions`` and ``batch["captions"]`` (a list of caption lists), every caption of an image
    is scored, each with its image. ``use_images=False`` scores the LM alone (image-blind) on the
    same tokens.
    """
    was_training = model.training
    model.eval()
    device = model.projector.fc1.weight.device
    total, count = torch.zeros((), dtype=torch.float64), 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = transform(batch) if transform is not None else batch
            feats = batch.get("features")
            images = batch.get("image")
            if use_images and feats is None:
                if images is None:
                    raise DataError(f"caption_perplexity with images needs batch['image'] or ['features']; "
                                    f"it has {sorted(batch)}")
                feats = model.features(images.to(device))
            if all_captions and "captions" in batch and "input_ids" not in batch:
                groups = batch["captions"]
                captions = [c for g in groups for c in g]
                owner = torch.tensor([k for k, g in enumerate(groups) for _ in g], device=device)
                text = model.batch_inputs({"caption": captions}, device)
            else:
                owner = None
                text = model.batch_inputs(batch, device)
            if use_images:
                feats = feats.to(device)
                feats = feats[owner] if owner is not None else feats
            out = model(None, **text, features=feats if use_images else None)
            total += out["nll_sum"].double().cpu()
            count += int(out["n_tokens"])
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("caption_perplexity saw no caption tokens: the loader is empty or every label is -100")
    return math.exp(total.item() / count)
