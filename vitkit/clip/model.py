"""Two-tower image-text models (CLIP, SigLIP): a vitkit image backbone and a text transformer
embedding into one space.

:class:`TwoTower` holds the image tower (``visual``, any vitkit backbone), the text tower
(``text``, a :class:`vitkit.text.TextTransformer`), the image projection (``visual_proj``), the
learnable temperature ``logit_scale`` (a log scale, as CLIP) and, for SigLIP, the learnable
``logit_bias``. ``model_args`` is a JSON-friendly dict from which :func:`build_two_tower`
rebuilds the model, so ``vitkit.weights_io.save_weights`` writes a self-describing file.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import ModelCard, create_model

# The normalisation OpenAI's CLIP was trained with (open_clip's OPENAI_DATASET_MEAN/STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP scales pixels to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

IMAGE_PROJS = ("linear", "none")
# The keys of ``TwoTower.model_args`` (and of :func:`build_two_tower`'s argument).
MODEL_ARG_KEYS = (
    "name", "image", "text", "embed_dim", "image_proj", "init_logit_scale", "init_logit_bias", "max_logit_scale",
    "tokenizer", "mean", "std",
)


def _jsonable(value):
    """Tuples -> lists, recursively, so ``model_args`` survives a JSON round trip unchanged."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _tower_out_dim(tower: nn.Module) -> int:
    """Width of what ``tower(images)`` returns: its classifier's outputs, else its pooled features."""
    num_classes = getattr(tower, "num_classes", 0) or 0
    return num_classes if num_classes > 0 else tower.num_features


@lru_cache(maxsize=16)
def _tokenizer_for(config_json: str):
    # Cached by config rather than held by the model, so deep copies (EMA) and pickling stay cheap.
    from ..text import load_tokenizer

    return load_tokenizer(json.loads(config_json))


class TwoTower(nn.Module):
    """An image tower and a text tower embedding into a shared ``embed_dim`` space.

    Args:
        image_tower: a vitkit backbone (``create_model(name, num_classes=0)``); ``image_tower(x)``
            gives its pooled features. A classifier head it carries is removed when
            ``image_proj="linear"``; with ``"none"`` its output must already be ``embed_dim`` wide
            (SigLIP: the MAP pool's output).
        text_tower: a :class:`vitkit.text.TextTransformer` whose ``output_dim`` is ``embed_dim``.
        embed_dim: the width of the shared embedding space.
        image_proj: ``"linear"`` (``visual_proj``: a bias-free Linear from the tower's features,
            as CLIP) or ``"none"``.
        init_logit_scale: initial log temperature (CLIP: log(1/0.07); SigLIP: log(10)).
        init_logit_bias: initial logit bias (SigLIP: -10); None: no ``logit_bias`` parameter.
        max_logit_scale: the log scale is clamped to it in :meth:`forward` (CLIP's ln(100));
            None: no clamp.
        tokenizer: the ``to_config()`` dict of the tokenizer the text tower was trained with;
            :meth:`tokenize` rebuilds it through ``vitkit.text.load_tokenizer``.
        mean, std: the image normalisation (default: the image tower's card's).
        model_name: the registered name (``create_clip`` sets it).
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        embed_dim: int,
        *,
        image_proj: str = "linear",
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
        max_logit_scale: float | None = math.log(100),
        tokenizer: dict | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        model_name: str | None = None,
    ):
        super().__init__()
        if image_proj not in IMAGE_PROJS:
            raise ConfigError(f"image_proj {image_proj!r} must be one of {IMAGE_PROJS}")
        if embed_dim < 1:
            raise ConfigError(f"embed_dim must be >= 1, got {embed_dim}")
        for what, tower, needs in (("image", image_tower, "num_features"), ("text", text_tower, "output_dim")):
            if not isinstance(tower, nn.Module) or not hasattr(tower, needs):
                raise ConfigError(
                    f"the {what} tower must be an nn.Module with a {needs!r} attribute, got {type(tower).__name__}"
                )
        if image_proj == "linear" and getattr(image_tower, "num_classes", 0):
            # The projection reads the pooled features; a classifier would never be trained.
            image_tower.reset_classifier(0)
            if isinstance(getattr(image_tower, "model_args", None), dict):
                image_tower.model_args = {**image_tower.model_args, "num_classes": 0}
        if text_tower.output_dim != embed_dim:
            raise ConfigError(
                f"the text tower outputs {text_tower.output_dim} features but embed_dim is {embed_dim}: "
                f"build the text tower with output_dim={embed_dim}"
            )
        image_dim = _tower_out_dim(image_tower)
        if image_proj == "none" and image_dim != embed_dim:
            raise ConfigError(
                f"image_proj='none' needs the image tower to output embed_dim={embed_dim} features, "
                f"it outputs {image_dim}: use image_proj='linear'"
            )
        self.visual = image_tower
        self.text = text_tower
        self.embed_dim = embed_dim
        self.image_proj = image_proj
        self.visual_proj = nn.Linear(image_dim, embed_dim, bias=False) if image_proj == "linear" else nn.Identity()
        if image_proj == "linear":
            # OpenAI CLIP draws its projection as width^-0.5 * randn.
            nn.init.normal_(self.visual_proj.weight, std=image_dim**-0.5)
        self.init_logit_scale = float(init_logit_scale)
        self.init_logit_bias = None if init_logit_bias is None else float(init_logit_bias)
        self.max_logit_scale = None if max_logit_scale is None else float(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(self.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(self.init_logit_bias)) if init_logit_bias is not None else None
        self.tokenizer_config = dict(tokenizer) if tokenizer is not None else None
        self.model_name = model_name or "two_tower"
        self.in_chans = getattr(image_tower, "in_chans", 3)
        card = getattr(image_tower, "card", None)
        size = tuple(card.input_size[1:]) if card is not None else tuple(image_tower.patch_embed.img_size)
        self.card = ModelCard(
            name=self.model_name,
            family="clip",
            input_size=(self.in_chans, *size),
            num_classes=0,
            mean=tuple(mean) if mean is not None else (card.mean if card is not None else OPENAI_CLIP_MEAN),
            std=tuple(std) if std is not None else (card.std if card is not None else OPENAI_CLIP_STD),
            crop_pct=1.0,
            interpolation="bicubic",
            paper="",
            notes="a two-tower image-text model; embeddings from encode_image / encode_text",
        )

    # ------------------------------------------------------------------ rebuilding
    @property
    def model_args(self) -> dict:
        """The dict :func:`build_two_tower` rebuilds this model from (fresh weights), JSON-friendly.

        ``image`` is ``{"model": <registered backbone name>, **its create_model arguments}``;
        ``text`` the text tower's ``model_args``.
        """
        name = getattr(self.visual, "model_name", None)
        if name is None:
            raise ConfigError(
                f"the image tower ({type(self.visual).__name__}) was not built by vitkit.create_model, so this "
                "model cannot describe how to rebuild it; build the tower with create_model(name, num_classes=0)"
            )
        image = {"model": name, **dict(getattr(self.visual, "model_args", {}) or {})}
        return _jsonable(dict(
            name=self.model_name, image=image, text=dict(self.text.model_args), embed_dim=self.embed_dim,
            image_proj=self.image_proj, init_logit_scale=self.init_logit_scale, init_logit_bias=self.init_logit_bias,
            max_logit_scale=self.max_logit_scale, tokenizer=self.tokenizer_config, mean=list(self.card.mean),
            std=list(self.card.std),
        ))

    @property
    def default_objective(self) -> str:
        """The objective this model is built for: ``"siglip"`` with a logit bias, else ``"clip"``."""
        return "siglip" if self.logit_bias is not None else "clip"

    # ------------------------------------------------------------------ tokenizer
    def set_tokenizer(self, tokenizer) -> None:
        """Use ``tokenizer`` (a vitkit tokenizer or its ``to_config()`` dict) for :meth:`tokenize`; it is
        saved with the model. Its vocabulary must fit the text tower's."""
        config = tokenizer if isinstance(tokenizer, dict) else tokenizer.to_config()
        vocab = _tokenizer_for(json.dumps(config, sort_keys=True)).vocab_size
        if vocab > self.text.vocab_size:
            raise ConfigError(
                f"the tokenizer has {vocab} tokens but the text tower embeds {self.text.vocab_size}: "
                f"build the text tower with vocab_size={vocab}"
            )
        self.tokenizer_config = dict(config)

    def tokenize(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Texts -> (N, context_length) int64 token ids on the model's device, with the model's own
        tokenizer (``context_length`` defaults to the text tower's)."""
        if self.tokenizer_config is None:
            raise ConfigError(
                f"{self.model_name} has no tokenizer: its vocabulary comes with a checkpoint. Set one with "
                "model.set_tokenizer(tokenizer) (see vitkit.text) or pass token ids to encode_text"
            )
        tok = _tokenizer_for(json.dumps(self.tokenizer_config, sort_keys=True))
        ids = tok(texts, context_length=context_length or self.text.context_length)
        return ids.to(self.logit_scale.device)

    # ------------------------------------------------------------------ forward
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, embed_dim) embeddings (unit length if ``normalize``)."""
        x = self.visual_proj(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor | str | list[str], normalize: bool = False) -> torch.Tensor:
        """(B, L) int64 token ids (or texts, tokenized with :meth:`tokenize`) -> (B, embed_dim) embeddings."""
        if not isinstance(tokens, torch.Tensor):
            tokens = self.tokenize(tokens)
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """The temperature the logits are multiplied by: exp of the (clamped) log scale."""
        s = self.logit_scale
        if self.max_logit_scale is not None:
            s = s.clamp(max=self.max_logit_scale)
        return s.exp()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        """Both towers: ``{"image_embeds", "text_embeds"}`` (unit length), ``"logit_scale"`` (the
        clamped exponentiated temperature) and ``"logit_bias"`` (None without one)."""
        return {
            "image_embeds": self.encode_image(images, normalize=True),
            "text_embeds": self.encode_text(tokens, normalize=True),
            "logit_scale": self.scale(),
            "logit_bias": self.logit_bias,
        }

    @staticmethod
    def logits(outputs: dict) -> torch.Tensor:
        """(N_images, N_texts) logits ``scale * <image, text> (+ bias)`` from :meth:`forward`'s outputs."""
        logits = outputs["logit_scale"] * outputs["image_embeds"] @ outputs["text_embeds"].T
        return logits + outputs["logit_bias"] if outputs.get("logit_bias") is not None else logits

    def image_features(self, images: torch.Tensor, layer: int = -2, drop_prefix: bool = True) -> torch.Tensor:
        """(B, N, C) tokens after image-tower block ``layer`` (default: the second-to-last, as LLaVA),
        before the final norm; class and register tokens removed unless ``drop_prefix=False``."""
        keep_prefix = not drop_prefix and getattr(self.visual, "num_prefix_tokens", 0) > 0
        out = self.visual.forward_intermediates(
            images, indices=[layer], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=keep_prefix
        )[0]
        if keep_prefix:
            x, prefix = out
            return torch.cat([prefix, x], dim=1)
        return out

    # ------------------------------------------------------------------ training hooks
    def no_weight_decay(self) -> set[str]:
        """The temperature, the bias, and what each tower leaves undecayed (full parameter names)."""
        names = {"logit_scale"} | ({"logit_bias"} if self.logit_bias is not None else set())
        for prefix, tower in (("visual.", self.visual), ("text.", self.text)):
            fn = getattr(tower, "no_weight_decay", None)
            if callable(fn):
                names |= {prefix + n for n in fn()}
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in (self.visual, self.text):
            fn = getattr(tower, "set_grad_checkpointing", None)
            if callable(fn):
                fn(enable)

    def block_modules(self) -> list[nn.Module]:
        """Both towers' repeated blocks (FSDP shards each one)."""
        out = []
        for tower in (self.visual, self.text):
            fn = getattr(tower, "block_modules", None)
            out += list(fn()) if callable(fn) else list(getattr(tower, "blocks", []))
        return out


def _image_tower(spec: dict) -> nn.Module:
    spec = dict(spec)
    name = spec.pop("model", None)
    if not name:
        raise ConfigError(f"the image tower spec needs 'model' (a registered backbone name), got {sorted(spec)}")
    for key in ("img_size", "patch_size"):
        if isinstance(spec.get(key), list):
            spec[key] = tuple(spec[key])
    spec.setdefault("num_classes", 0)
    return create_model(name, **spec)


def build_two_tower(model_args: dict) -> TwoTower:
    """The :class:`TwoTower` that ``model_args`` (a ``TwoTower.model_args`` dict) describes, freshly initialised."""
    unknown = sorted(set(model_args) - set(MODEL_ARG_KEYS))
    if unknown:
        raise ConfigError(f"unknown two-tower arguments {unknown}; valid: {', '.join(MODEL_ARG_KEYS)}")
    missing = [k for k in ("image", "text", "embed_dim") if k not in model_args]
    if missing:
        raise ConfigError(f"two-tower arguments miss {missing}")
    from ..text import TextTransformer

    image = _image_tower(model_args["image"])
    try:
        text = TextTransformer(**model_args["text"])
    except TypeError as e:
        raise ConfigError(f"bad text tower arguments {model_args['text']}: {e}") from None
    kwargs = {k: model_args[k] for k in ("image_proj", "init_logit_scale", "init_logit_bias", "max_logit_scale",
                                          "tokenizer", "mean", "std") if k in model_args}
    return TwoTower(image, text, model_args["embed_dim"], model_name=model_args.get("name"), **kwargs)


def with_card(model: TwoTower, saved_card: dict) -> TwoTower:
    """``model`` with the labels and paper of a saved card (what a weights file carries besides the config)."""
    keep = {k: saved_card[k] for k in ("paper", "notes") if saved_card.get(k)}
    if saved_card.get("labels"):
        keep["labels"] = tuple(saved_card["labels"])
    if keep:
        model.card = replace(model.card, **keep)
    return model


__all__ = [
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "SIGLIP_MEAN", "SIGLIP_STD", "TwoTower", "build_two_tower",
]
