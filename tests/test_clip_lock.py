"""LiT (locked-image tuning) on the clip and siglip objectives: the loss and gradients equal a reference
that embeds the images with the tower held fixed (eval mode, no gradient), the locked tower (BatchNorm
statistics included) leaves training bitwise as it came, unlocked last blocks do train, bad keys are clear."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import make_trainer
from torch.utils.data import Dataset

from vitkit.clip import create_clip
from vitkit.errors import ConfigError
from vitkit.objectives import build_objective


def _model(tower: str = "test_vit_convstem"):
    torch.manual_seed(0)
    return create_clip("clip_test", image={"model": tower})


def _batch(model, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 400, (n, model.text.context_length), generator=g)
    return {"image": images, "text": tokens}


def _lit_reference(model, batch):
    """LiT (Zhai et al., 2022): image features from the pretrained tower as a fixed function (eval mode,
    no gradient), a learned linear head on them, the text tower trained; CLIP's symmetric cross-entropy."""
    model.visual.eval()
    with torch.no_grad():
        feats = model.visual(batch["image"])
    img = F.normalize(model.visual_proj(feats), dim=-1)
    txt = F.normalize(model.text(batch["text"]), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_keys_are_registered_and_off_by_default(name):
    obj = build_objective(name, _model() if name == "clip" else create_clip("siglip_test"))
    assert obj.cfg.lock_image is False and obj.cfg.lock_image_unlocked_blocks == 0
    assert obj.frozen_modules() == {}


def test_locked_tower_matches_the_lit_reference():
    model = _model()
    ref = copy.deepcopy(model)
    obj = build_objective("clip", model, {"lock_image": True})
    obj.freeze()
    obj.train()
    stats = {k: v.clone() for k, v in model.visual.state_dict().items() if "running" in k}
    assert stats, "the conv stem's BatchNorm should have running statistics"
    batch = _batch(model)
    out = obj(batch)
    out["loss"].backward()
    loss = _lit_reference(ref, batch)
    loss.backward()
    torch.testing.assert_close(out["loss"], loss, atol=1e-5, rtol=1e-5)
    # No gradient reaches the tower; the text tower, the projection and the temperature get the reference's.
    assert all(p.grad is None and not p.requires_grad for p in model.visual.parameters())
    mine = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if not name.startswith("visual."):
            torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    # The tower ran in eval mode: its BatchNorm statistics did not move.
    after = model.visual.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())


class TokenPairs(Dataset):
    def __init__(self, model, n=16, seed=0):
        self.b = _batch(model, n, seed)

    def __len__(self):
        return len(self.b["image"])

    def __getitem__(self, i):
        return {"image": self.b["image"][i], "text": self.b["text"][i], "skipped": torch.tensor(False)}


@pytest.mark.parametrize("name, tower", [("clip", "test_vit_convstem"), ("siglip", "test_vit")])
def test_training_leaves_the_locked_tower_as_it_came(tmp_path, name, tower):
    model = _model(tower) if name == "clip" else create_clip("siglip_test")
    before = copy.deepcopy(model.state_dict())
    obj = build_objective(name, model, {"lock_image": True})
    tr = make_trainer(tmp_path, objective=obj, dataset=TokenPairs(model), val_dataset=TokenPairs(model, 8, 1),
                      transform=None, batch_size=8, epochs=2, optim={"lr": 1e-2, "weight_decay": 0.05})
    tr.fit()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and not any(k.startswith("visual.") for k in moved), sorted(k for k in moved if k.startswith("visual."))
    assert any(k.startswith("text.") for k in moved)
    assert name == "siglip" or any(k.startswith("visual_proj.") for k in moved)  # siglip_test: no projection


def test_unlocked_blocks_train_and_the_rest_stays(tmp_path):
    model = _model("test_vit")
    before = copy.deepcopy(model.state_dict())
    obj = build_objective("clip", model, {"lock_image": True, "lock_image_unlocked_blocks": 1})
    tr = make_trainer(tmp_path, objective=obj, dataset=TokenPairs(model), val_dataset=TokenPairs(model, 8, 1),
                      transform=None, batch_size=8, epochs=2, optim={"lr": 1e-2, "weight_decay": 0.0})
    tr.fit()
    after = model.state_dict()
    moved = {k for k in before if k.startswith("visual.") and not torch.equal(before[k], after[k])}
    last = len(model.visual.blocks) - 1
    assert moved and all(k.startswith((f"visual.blocks.{last}.", "visual.norm.", "visual.fc_norm.")) for k in moved)
    assert any(k.startswith(f"visual.blocks.{last}.") for k in moved)
    obj.train()
    assert model.visual.blocks[last].training and not model.visual.blocks[0].training


def test_bad_lock_keys_are_clear_errors():
    with pytest.raises(ConfigError, match="needs objective.lock_image=true"):
        build_objective("clip", _model(), {"lock_image_unlocked_blocks": 1})
    with pytest.raises(ConfigError, match="has 2 blocks"):
        build_objective("clip", _model(), {"lock_image": True, "lock_image_unlocked_blocks": 5})
    with pytest.raises(ConfigError, match=">= 0"):
        build_objective("siglip", create_clip("siglip_test"), {"lock_image": True, "lock_image_unlocked_blocks": -1})
