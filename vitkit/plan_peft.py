"""The no-flag plan's fine-tuning rules: from which pretrained model, at what resolution, how, and
when parameter-efficient fine-tuning (``peft.method``) replaces training every weight.

**Resolution.** Photos with pretrained weights (the plan's own, or the user's ``model.init`` of an
architecture the file does not record) fine-tune the pretrained model at its own resolution when the
budget affords ``FINETUNE_MIN_EPOCHS`` passes there, else at half of it (a multiple of its patch:
a quarter of the tokens, about four times the speed); :func:`finetune_reason` says which and why.

**Recipe.** A lower lr than from scratch, layer-wise lr decay (``LAYER_DECAY``), gradient clipping,
warmup and cosine decay (:func:`set_finetune_recipe`).

**PEFT.** When the run starts from pretrained weights and has at most ``PEFT_MAX_IMAGES`` training
images, the plan trains LoRA on the attention's ``qkv`` projections (the linear probe where LoRA does
not apply) instead of every weight. That is the regime of VTAB-1k (1,000 images per task), where
LoRA, VPT and adapters match or beat full fine-tuning of a pretrained ViT while training about 1% of
its weights, in less memory and time. The user's ``peft.method`` (``none`` included, which trains
every weight) always wins. PEFT runs train at ``PEFT_LR_128`` without layer-wise lr decay (the frozen
base needs no protection, and the decay would starve the method's weights in the early blocks).
"""

from __future__ import annotations

from .errors import VitkitError
from .models import get_model_card
from .plan_calibrate import Candidate, first_stride

# Passes a fine-tuning run needs at the pretrained resolution (else half of it): the least the
# plan gives a fine-tuning run on a GPU (plan.gpu_epochs).
FINETUNE_MIN_EPOCHS = 10
LAYER_DECAY = 0.65
PEFT_MAX_IMAGES = 2_000
# AdamW lr at batch 128: the VTAB-1k recipe of the LoRA/adapter baselines (1e-3 at batch 64, as in
# NOAH, Zhang et al. 2022), square-root scaled like the plan's other rates.
PEFT_LR_128 = 1.4e-3


def pretrained_candidates(name: str, pretrained: str | None) -> list[Candidate]:
    """Model ``name`` at its card's resolution, then at half of it; ``pretrained``: the plan's hub id of
    its weights, None when the user's ``model.init`` brings them."""
    full = get_model_card(name).input_size[1]
    stride = first_stride(name, full)
    half = max(stride, full // 2 // stride * stride)
    return [Candidate(name, full, pretrained=pretrained), Candidate(name, half, pretrained=pretrained)]


def finetune_reason(side: int, cands: list[Candidate], cand: Candidate, fit: str, full_epochs: str | None) -> str:
    """The plan's reason for fine-tuning ``cand`` (one of :func:`pretrained_candidates`) on ``side`` px
    photos; ``fit``: what the budget affords it; ``full_epochs``: the passes at the full resolution."""
    what = f"pretrained {cand.pretrained}" if cand.pretrained else f"{cand.name} from model.init"
    if cand is cands[0]:
        return f"{side} px photos: fine-tune {what} at its own {cand.img_size} px; {fit}"
    there = f"only ~{full_epochs} epochs" if full_epochs else "fewer epochs"
    return (f"{side} px photos: fine-tune {what} at {cand.img_size} px, half its {cands[0].img_size} px, where "
            f"{there} would fit (< {FINETUNE_MIN_EPOCHS}); {fit}")


def set_finetune_recipe(plan, peft: str | None, user: dict) -> None:
    """Layer-wise lr decay (not under PEFT), clipping and a cosine schedule in ``plan``."""
    if "optim.layer_decay" not in user and not peft:
        plan.set("optim.layer_decay", LAYER_DECAY, "layer-wise lr decay keeps early pretrained blocks close")
    plan.set("optim.clip_grad", 1.0, "fine-tuning: clip gradients at norm 1")
    plan.set("schedule.name", "cosine", "fine-tuning: linear warmup, cosine decay")


def supported(name: str, img_size: int, args: dict) -> list[str]:
    """The PEFT methods that apply to model ``name``, asked of the model itself (built on the meta device)."""
    import torch

    from .models import create_model
    from .peft import supported_methods

    with torch.device("meta"):
        model = create_model(name, img_size=img_size, **dict(args))
    return list(supported_methods(model))


def plan_peft(plan, n_train: int, model: tuple[str, int, dict], user: dict, init: str | None) -> str | None:
    """Set ``peft.method`` in ``plan`` by the rule above; returns the method the run will use (None: every weight).

    ``model`` is the planned (name, img_size, args); ``init`` the weights the run starts from, if any.
    """
    if "peft.method" in user:
        return user["peft.method"] or None
    if init is None:
        return None
    if n_train > PEFT_MAX_IMAGES:
        plan.notes.append(f"{n_train:,} training images (> {PEFT_MAX_IMAGES:,}): every weight is fine-tuned; "
                          "peft.method=lora trains about 1% of them, in less memory and time")
        return None
    try:
        methods = supported(*model)
    except (VitkitError, TypeError, ValueError):  # the build itself reports a bad model later, in full
        methods = []
    method = "lora" if "lora" in methods else "linear"
    how = ("LoRA on the attention's qkv" if method == "lora"
           else f"a linear probe ({model[0]} has no qkv Linear for LoRA)")
    plan.set("peft.method", method,
             f"fine-tuning pretrained weights on {n_train:,} images (<= {PEFT_MAX_IMAGES:,}, VTAB-1k's regime, where "
             f"PEFT matches full fine-tuning): {how} plus the head; peft.method=none trains every weight")
    return method
