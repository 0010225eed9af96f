"""vitkit models under HF ``peft``'s LoRA, and vitkit's LoRA against it: same counts, same training step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import lazy_peer

from vitkit import create_model
from vitkit.peft import PeftConfig, apply_peft

peft = lazy_peer("peft")


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.peer("peft")
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_one_step_matches_hf_peft_lora(opt):
    torch.manual_seed(0)
    base = create_model("vit_tiny_patch16_224", img_size=32, num_classes=5).eval()  # dropout-free, 2x2 patches
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]),
    )
    ours = copy.deepcopy(base)
    info = apply_peft(ours, PeftConfig(method="lora", lora_rank=8, lora_alpha=8.0, lora_targets=["qkv"]))

    hf_lora = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p
               for n, p in theirs.named_parameters() if "lora_" in n}
    assert sorted(hf_lora) == sorted(info.params)
    assert sum(p.numel() for p in hf_lora.values()) == info.n_method == 12 * 8 * (192 + 576)
    # The same A as peft drew, and a non-zero B (with B = 0 the step would not reach A).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf_lora.items():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            ours.get_parameter(n).copy_(p)

    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
    trained = {}
    for key, model in (("ours", ours), ("theirs", theirs)):
        params = [p for p in model.parameters() if p.requires_grad]
        optim = (torch.optim.SGD(params, lr=0.5) if opt == "sgd"
                 else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05))
        first = _loss(model, x, y)
        first.backward()
        optim.step()
        optim.zero_grad()
        second = _loss(model, x, y)
        second.backward()
        trained[key] = first.item(), second.item()
    assert trained["ours"][0] == pytest.approx(trained["theirs"][0], abs=1e-6)
    assert trained["ours"][1] == pytest.approx(trained["theirs"][1], abs=1e-6)
    assert abs(trained["ours"][1] - trained["ours"][0]) > 1e-3  # the step changed the loss
    for n, p in hf_lora.items():
        mine = ours.get_parameter(n)
        torch.testing.assert_close(mine, p, atol=1e-6, rtol=0)
        torch.testing.assert_close(mine.grad, p.grad, atol=1e-6, rtol=0)
    head = theirs.base_model.model.head.modules_to_save["default"]
    torch.testing.assert_close(ours.head.weight.grad, head.weight.grad, atol=1e-6, rtol=0)
