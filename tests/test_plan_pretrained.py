"""The plan's pretrained path end to end, on a tiny checkpoint the tests write into a local hub cache.

``test_vit`` stands in for the plan's pretrained model (its card is made to publish ``HUB_ID``), so
that the whole path runs in seconds: the cache lookup, reading the file, the model built for the
data's channels and classes, the weights loaded with a new head, layer-wise lr decay in the
optimizer, gray images through training; and every failure (nothing cached, a corrupt file, weights
that do not fit) ending in a from-scratch plan with its reason on one line. The checkpoint is a
timm ViT's, so the loaded model is checked against timm's own forward pass.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from helpers import lazy_peer, perturb
from PIL import Image
from safetensors.torch import save_file

import vitkit
from vitkit import plan as plan_mod
from vitkit.config import load_config
from vitkit.models import _registry
from vitkit.plan_calibrate import Candidate, init_candidate, time_model, usable_pretrained
from vitkit.weights_io import save_weights

timm = lazy_peer("timm")
HUB_ID = "vitkit-tests/test_vit.tiny_in1k"
# test_vit's architecture, as timm's VisionTransformer takes it.
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def publish(monkeypatch) -> None:
    """Make ``test_vit``'s card publish ``HUB_ID`` and the plan take it as its pretrained model."""
    entry = _registry._MODELS["test_vit"]
    card = dataclasses.replace(entry.card, hub_id=HUB_ID)
    monkeypatch.setitem(_registry._MODELS, "test_vit", dataclasses.replace(entry, card=card))
    monkeypatch.setattr(plan_mod, "PRETRAINED_MODEL", "test_vit")


def tensors(module) -> dict:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


@pytest.fixture
def tiny_hub(hub_cache, monkeypatch):
    """(snapshot folder, timm model): a timm ViT with random weights, cached as ``HUB_ID``'s model.safetensors."""
    publish(monkeypatch)
    # Timing precision is not under test here: a shorter calibration keeps the tests quick.
    monkeypatch.setattr(plan_mod, "time_model", partial(time_model, min_s=0.2))
    peer = perturb(timm.models.vision_transformer.VisionTransformer(num_classes=1000, **TINY))
    snapshot = hub_cache(HUB_ID)
    save_file(tensors(peer), snapshot / "model.safetensors")
    return snapshot, peer


def gray_folders(root, per_class=20, size=56, seed=0):
    """Class folders of gray noise photos, larger than the small-image branch (48 px)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 60 * c, 40, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")


def no_flag_config(tmp_path, *extra):
    """``vitkit train --data DIR`` with a fixed length (10 epochs: enough for the pretrained resolution)."""
    return load_config(None, [f"data.path={tmp_path / 'data'}", "engine.epochs=10", f"engine.out_dir={tmp_path / 'run'}",
                              "engine.plots=false", "engine.tensorboard=false", "data.num_workers=0", *extra])


def layer_of(name: str) -> int:
    """Layer ids of a 2-block ViT under layer-wise decay (BEiT's rule, as timm applies it): embeddings 0,
    block i -> i + 1, the final norm with the last block, the head on top (3)."""
    name = name.removeprefix("model.")
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return 2 if name.startswith("norm.") else 3


@pytest.mark.peer("timm")
def test_no_flag_run_fine_tunes_the_cached_checkpoint_on_gray_photos(tiny_hub, tmp_path):
    from vitkit.train import build_run

    _, peer = tiny_hub
    gray_folders(tmp_path / "data")
    # peft.method=none: 54 images would otherwise train LoRA (plan_peft), without layer decay.
    trainer, info = build_run(no_flag_config(tmp_path, "peft.method=none", "engine.max_steps=2"), verbose=False)
    plan = info["plan"]
    assert plan["model.name"]["value"] == "test_vit" and plan["model.init"]["value"] == HUB_ID
    assert plan["data.img_size"]["value"] == 32 and "its own 32 px" in plan["model.name"]["reason"]
    assert plan["schedule.name"]["value"] == "cosine" and plan["optim.layer_decay"]["value"] == 0.65
    assert info["in_chans"] == 1 and info["num_classes"] == 3

    # Loaded: the gray kernel is the RGB kernel summed over its channels, every other backbone
    # tensor is the checkpoint's, and the head is new (3 classes, not 1000).
    model, ref = trainer.objective.model, tensors(peer)
    got = tensors(model)
    torch.testing.assert_close(got["patch_embed.proj.weight"], ref["patch_embed.proj.weight"].sum(1, keepdim=True),
                               rtol=0, atol=1e-6)
    for k in ref:
        if not k.startswith(("head.", "patch_embed.proj.weight")):
            assert torch.equal(got[k], ref[k]), k
    assert got["head.weight"].shape == (3, 64) and ref["head.weight"].shape == (1000, 64)
    # timm's forward on the gray image replicated to RGB gives the same features.
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        ours = model.eval().forward_features(x)
        theirs = peer.forward_features(x.expand(-1, 3, -1, -1))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    # Layer-wise lr decay: 0.65 per layer down from the head, for every trainable parameter.
    seen = set()
    for group in trainer.optimizer.param_groups:
        for name in group["names"]:
            assert group["lr_scale"] == pytest.approx(0.65 ** (3 - layer_of(name))), name
            seen.add(name)
    assert seen == {n for n, p in trainer.objective.named_parameters() if p.requires_grad}

    # Gray images train through the loader at the planned size.
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["stopped"] == "max_steps"


@pytest.mark.peer("timm")
def test_corrupt_cached_checkpoint_falls_back_to_scratch_in_one_line(tiny_hub, tmp_path, capsys):
    from vitkit.train import build_run

    snapshot, _ = tiny_hub
    (snapshot / "model.safetensors").write_bytes(b"\0" * 64)  # a zero-length header: no tensors at all
    gray_folders(tmp_path / "data")
    _, info = build_run(no_flag_config(tmp_path), verbose=True)
    plan = info["plan"]
    assert "model.init" not in plan and plan["model.name"]["value"].startswith("vit_nano_convstem")
    assert plan["schedule.name"]["value"] == "onecycle" and "optim.layer_decay" not in plan
    lines = [line for line in capsys.readouterr().out.splitlines() if "corrupt" in line]
    assert len(lines) == 1, lines
    assert "from scratch" in lines[0] and f"pretrained {HUB_ID} unusable" in lines[0]


def test_usable_pretrained_reads_the_weights_before_relying_on_them(hub_cache, monkeypatch):
    publish(monkeypatch)
    hub, why = usable_pretrained("test_vit", 1, 3)
    assert hub is None and why == "no test_vit weights in the hub cache, and the hub is unreachable"
    snapshot = hub_cache(HUB_ID)
    save_file(tensors(vitkit.create_model("test_vit", embed_dim=32)), snapshot / "model.safetensors")
    hub, why = usable_pretrained("test_vit", 1, 3)  # another width: the weights do not fit
    assert hub is None and why.startswith(f"pretrained {HUB_ID} unusable (WeightsError: ") and "\n" not in why
    save_file(tensors(vitkit.create_model("test_vit")), snapshot / "model.safetensors")
    assert usable_pretrained("test_vit", 1, 3) == (HUB_ID, None)  # gray input, 3 classes: it fits


def test_init_candidate_reads_the_recorded_architecture(tmp_path):
    model = vitkit.create_model("test_vit", num_classes=6, in_chans=1, depth=1, drop_path_rate=0.1)
    save_weights(model, tmp_path / "model.safetensors")
    # The run's own arguments (classes, channels, size, drop path) come from the data and the config.
    recorded = Candidate("test_vit", 32, (("depth", 1),))
    assert init_candidate(str(tmp_path / "model.safetensors")) == recorded
    assert init_candidate(str(tmp_path)) == recorded  # a folder holding model.safetensors
    save_file(tensors(model), tmp_path / "plain.safetensors")  # weights without vitkit's record
    assert init_candidate(str(tmp_path / "plain.safetensors")) is None
    assert init_candidate("timm/deit_tiny_patch16_224.fb_in1k") == Candidate("deit_tiny_patch16_224", 224)
    assert init_candidate(str(tmp_path / "missing.safetensors")) is None and init_candidate(None) is None


def test_init_from_a_vitkit_file_builds_the_architecture_it_records(tmp_path, monkeypatch):
    """``vitkit train --init FILE --data DIR``: the run builds the file's model (here one block, not
    test_vit's two), loads it with a new head and the data's channels, and fine-tunes it."""
    from vitkit.train import build_run

    monkeypatch.setattr(plan_mod, "time_model", partial(time_model, min_s=0.2))
    source = vitkit.create_model("test_vit", num_classes=6, depth=1)
    save_weights(source, tmp_path / "init.safetensors")
    gray_folders(tmp_path / "data")
    cfg = no_flag_config(tmp_path, f"model.init={tmp_path / 'init.safetensors'}", "peft.method=none")
    trainer, info = build_run(cfg, verbose=False)
    plan = info["plan"]
    assert info["model"] == "test_vit" and plan["model.args"]["value"] == {"depth": 1}
    assert plan["schedule.name"]["value"] == "cosine" and plan["optim.layer_decay"]["value"] == 0.65
    assert "from scratch" not in plan["optim.lr"]["reason"] and "model.init" not in plan
    got, ref = tensors(trainer.objective.model), tensors(source)
    assert got["head.weight"].shape == (3, 64) and len(trainer.objective.model.blocks) == 1
    torch.testing.assert_close(got["patch_embed.proj.weight"], ref["patch_embed.proj.weight"].sum(1, keepdim=True),
                               rtol=0, atol=1e-6)
    assert all(torch.equal(got[k], ref[k]) for k in ref if k.startswith("blocks."))
