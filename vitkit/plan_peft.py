"""The no-flag plan's choice of parameter-efficient fine-tuning (``peft.method``).

Rule: when the run starts from pretrained weights (``model.init``, the user's or the plan's own
ImageNet weights) and has at most ``PEFT_MAX_IMAGES`` training images, the plan trains LoRA on the
attention's ``qkv`` projections (the linear probe where LoRA does not apply) instead of every weight.
That is the regime of VTAB-1k (1,000 images per task), where LoRA, VPT and adapters match or beat
full fine-tuning of a pretrained ViT while training about 1% of its weights, in less memory and time.
The user's ``peft.method`` (``none`` included, which trains every weight) always wins.

PEFT runs train at ``PEFT_LR_128`` without layer-wise lr decay (the frozen base needs no protection,
and the decay would starve the method's weights in the early blocks).
"""

from __future__ import annotations

from .errors import VitkitError

PEFT_MAX_IMAGES = 2_000
# AdamW lr at batch 128: the VTAB-1k recipe of the LoRA/adapter baselines (1e-3 at batch 64, as in
# NOAH, Zhang et al. 2022), square-root scaled like the plan's other rates.
PEFT_LR_128 = 1.4e-3


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
