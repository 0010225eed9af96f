"""The self-supervised objectives against their papers' reference code, on fixed inputs.

Each expectation is computed here from the reference algorithm (DINO's and MoCo v3's train-mode
teacher, iBOT's patch centre, DINO's clip_gradients and frozen last layer, MoCo v3's frozen patch
projection, the stem check of masked objectives), never by calling the code under test.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import make_trainer
from torch.utils.data import DataLoader, Dataset

from vitkit.engine import OptimConfig
from vitkit.engine.optim import build_optimizer, optimizer_step
from vitkit.engine.protocol import StepContext
from vitkit.errors import ConfigError
from vitkit.models import create_model
from vitkit.objectives import IBOT, MAE, DINOConfig, IBOTConfig, MoCoV3, MoCoV3Config
from vitkit.objectives.dino import DINO
from vitkit.pretrain import pretrain_config, pretrain_overrides

TINY_HEAD = dict(out_dim=32, hidden_dim=32, bottleneck_dim=16, head_layers=2)


class Views(Dataset):
    """32 px images, 2 global views (the image and its flip) and one 16 px local crop."""

    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.arange(n) % 4

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return {"image": x, "label": self.y[i], "views": [x, x.flip(-1), x[:, 8:24, 8:24]]}


def batch(n: int = 8, seed: int = 0) -> dict:
    return next(iter(DataLoader(Views(n, seed), batch_size=n)))


def step_ctx(step: int, total: int, optimizer) -> StepContext:
    return StepContext(step=step, total_steps=total, optimizer=optimizer,
                       trainer=SimpleNamespace(scheduler=None, steps_per_epoch=None))


# ---------------------------------------------------------------- teachers in train mode (BatchNorm)


def reference_bn_update(mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, momentum=0.1):
    """PyTorch's (and so the references') BatchNorm in train mode after a 3x3 conv of ``x``:
    running = (1 - m) * running + m * batch statistic, the variance unbiased."""
    y = F.conv2d(x, weight, padding=1)
    return (1 - momentum) * mean + momentum * y.mean((0, 2, 3)), (1 - momentum) * var + momentum * y.var((0, 2, 3))


@pytest.mark.parametrize("method", ["dino", "mocov3"])
def test_teacher_batchnorm_statistics_follow_its_own_forward_passes(method):
    """DINO's teacher and MoCo v3's momentum encoder run in train mode in the reference code: the
    first stem BatchNorm's running statistics after 3 steps equal the rule applied to the teacher's
    own conv weights and inputs at each step (not the initial 0 / 1)."""
    torch.manual_seed(0)
    model = create_model("test_vit_convstem", num_classes=4)
    if method == "dino":
        obj = DINO(model, DINOConfig(**TINY_HEAD, freeze_last_layer_epochs=0, weight_decay_end=None))
        teacher = obj.teacher
    else:
        obj = MoCoV3(model, MoCoV3Config(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32))
        teacher = obj.momentum_encoder
    obj.freeze()
    obj.train()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    conv, bn = teacher.patch_embed.stem[0], teacher.patch_embed.stem[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(1, 4):
        b = batch(8, seed=step)
        mean, var = reference_bn_update(mean, var, torch.cat(b["views"][:2]), conv.weight.detach().clone())
        obj(b)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.on_step_end(step_ctx(step, 3, opt))
    assert not torch.allclose(bn.running_mean, torch.zeros_like(mean))
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, var, atol=1e-5, rtol=1e-4)
    assert int(bn.num_batches_tracked) == 3
    assert not teacher.training  # still a frozen module: only its BatchNorms switch, during the step
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_batchnorm_untouched_in_eval_mode():
    torch.manual_seed(0)
    obj = DINO(create_model("test_vit_convstem", num_classes=4), DINOConfig(**TINY_HEAD)).eval()
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    with torch.no_grad():
        obj(batch())
    assert all(torch.equal(before[k], v) for k, v in obj.teacher.state_dict().items())


# ---------------------------------------------------------------- iBOT's patch centre


def ibot(**kw):
    torch.manual_seed(0)
    return IBOT(create_model("test_vit", num_classes=4), IBOTConfig(**{**TINY_HEAD, "koleo_weight": 0.1, **kw}))


def record_mask(obj) -> list:
    """Wrap the student's forward_tokens to keep the token mask it was given."""
    seen, inner = [], obj.model.forward_tokens

    def forward_tokens(tokens, ctx, **kw):
        seen.append(kw.get("token_mask"))
        return inner(tokens, ctx, **kw)

    obj.model.forward_tokens = forward_tokens
    return seen


def teacher_patch_logits(obj, b) -> torch.Tensor:
    """(2B, L, K): the teacher head on every patch token of the unmasked global crops."""
    with torch.no_grad():
        tokens = obj.teacher.forward_features(torch.cat(b["views"][:2]))[:, obj.teacher.num_prefix_tokens:]
        return obj.teacher_head(tokens.flatten(0, 1)).view(tokens.shape[0], tokens.shape[1], -1)


@pytest.mark.parametrize("patch_center", ["all", "masked"])
def test_ibot_patch_centre_equals_the_reference(patch_center):
    """iBOT's code: centre2 = m * centre2 + (1 - m) * mean over the images of each image's mean
    over ALL its patch tokens (the default); DINOv2/lightly: the mean over the masked tokens."""
    obj = ibot(mask_prob=0.5, **({} if patch_center == "all" else {"patch_center": patch_center})).train()
    seen = record_mask(obj)
    b = batch(8)
    expected_all = teacher_patch_logits(obj, b)  # the teacher has not moved yet
    obj(b)
    mask = seen[0]
    assert 0 < int(mask.sum()) < mask.numel()
    batch_center = expected_all.mean(1).mean(0) if patch_center == "all" else expected_all[mask].mean(0)
    torch.testing.assert_close(obj.center_patch[0], 0.1 * batch_center, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"patch_center": "masked"}, {"centering": "sinkhorn_knopp"},
                                {"centering": "sinkhorn_knopp", "patch_center": "masked"}],
                         ids=["all", "masked", "sk_all", "sk_masked"])
def test_ibot_batch_without_masked_tokens_stays_finite(kw):
    obj = ibot(mask_prob=0.0, **kw).train()
    out = obj(batch(8))
    assert torch.isfinite(out["loss"]) and float(out["patch_loss"]) == 0.0
    assert torch.isfinite(obj.center_patch).all() and torch.isfinite(obj.center).all()
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in obj.parameters() if p.grad is not None)


# ---------------------------------------------------------------- masked objectives and the stem


@pytest.mark.parametrize("name", ["test_vit_convstem", "test_vit_hybrid"])
@pytest.mark.parametrize("method", ["mae", "ibot"])
def test_masked_objective_refuses_a_stem_that_mixes_patches(method, name):
    model = create_model(name, num_classes=4)
    build = (lambda **kw: MAE(model, 8, **kw)) if method == "mae" else (
        lambda **kw: IBOT(model, IBOTConfig(**TINY_HEAD, **kw)))
    with pytest.raises(ConfigError, match=rf"(?s){name}.*conv_stem=false.*allow_mixing_stem=true"):
        build()
    build(allow_mixing_stem=True)  # the explicit override


def test_masked_objective_accepts_a_patch_local_stem_and_pretrain_picks_one():
    from vitkit.objectives.ssl import stem_mixes_patches

    model = create_model("test_vit", num_classes=4)
    state = torch.random.get_rng_state()
    assert not stem_mixes_patches(model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched
    MAE(model, 8)
    IBOT(create_model("test_vit", num_classes=4), IBOTConfig(**TINY_HEAD))
    assert "model.args.conv_stem=false" in pretrain_overrides("ibot")
    assert "model.args.conv_stem=false" not in pretrain_overrides("ibot", ["model.name=test_vit"])


# ---------------------------------------------------------------- DINO: clipping, frozen last layer, decay


def test_per_param_clipping_equals_dinos_clip_gradients():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (5,), (2, 2), (3,)]]
    grads = [torch.randn(p.shape) * s for p, s in zip(params, [10.0, 0.1, 5.0, 0.0])]
    expected = []
    for g in grads:  # DINO utils.clip_gradients
        g = g.clone()
        clip_coef = 3.0 / (g.norm(2) + 1e-6)
        if clip_coef < 1:
            g.mul_(clip_coef)
        expected.append(g)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = torch.optim.SGD(params, lr=1.0)
    before = [p.detach().clone() for p in params]
    norm = optimizer_step(opt, torch.amp.GradScaler("cpu", enabled=False), params, 3.0, "per_param")
    for p, b, e in zip(params, before, expected):
        torch.testing.assert_close(b - p.detach(), e)
    torch.testing.assert_close(norm, torch.stack([g.norm() for g in grads]).norm())
    with pytest.raises(ValueError, match="clip_mode"):
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(clip_mode="layer"), 512)


def test_dino_and_ibot_pretrain_defaults_clip_per_parameter():
    for method in ("dino", "ibot"):
        cfg = pretrain_config(method, overrides=["model.name=test_vit"])
        assert cfg.optim.clip_mode == "per_param" and cfg.optim.clip_grad == 3.0
        assert cfg.engine.find_unused_parameters
    assert pretrain_config("mae", overrides=["model.name=test_vit"]).optim.clip_mode == "global"


def test_dino_frozen_last_layer_leaves_adamw_state_untouched(tmp_path):
    """The reference sets the last layer's grads to None while frozen: AdamW keeps no state for it
    through the first epoch (no step count, no moments), then steps it from scratch."""
    seen = []

    class Record:
        def on_step_end(self, ctx):
            last = ctx.trainer.objective.head.last_layer.weight_v
            st = ctx.optimizer.state.get(last, {})
            seen.append((ctx.step, int(st["step"]) if "step" in st else 0,
                         st["exp_avg"].abs().sum().item() if "exp_avg" in st else 0.0, last.detach().clone()))

    def make():
        torch.manual_seed(0)
        # The reference's rule alone (freeze_last_layer_max=1): the first of two epochs is frozen.
        return DINO(create_model("test_vit", num_classes=4), DINOConfig(**TINY_HEAD, freeze_last_layer_max=1.0))

    v0 = make().head.last_layer.weight_v.detach().clone()
    tr = make_trainer(tmp_path, objective=make(), dataset=Views(), val_dataset=Views(8, seed=1), transform=None,
                      batch_size=8, hooks=[Record()], optim={"lr": 1e-3, "weight_decay": 0.04}, epochs=2)
    tr.fit()
    assert tr.steps_per_epoch == 4
    for _, adam_steps, exp_avg, v in seen[:4]:  # frozen: no state, weights (decay included) unchanged
        assert adam_steps == 0 and exp_avg == 0.0 and torch.equal(v, v0)
    assert [s[1] for s in seen[4:]] == [1, 2, 3, 4]  # counted from the first unfrozen step


def test_dino_decays_every_matrix_like_its_reference():
    """DINO's get_params_groups: every parameter with ndim > 1 decayed (weight_v, cls_token, pos_embed,
    iBOT's mask token), biases and norms not."""
    from vitkit.engine.optim import param_groups

    obj = IBOT(create_model("test_vit", num_classes=4), IBOTConfig(**TINY_HEAD))
    obj.freeze()
    decay = {n: g["weight_decay"] for g in param_groups(obj, 0.04) for n in g["names"]}
    for name in ("head.last_layer.weight_v", "model.cls_token", "model.pos_embed", "mask_token", "head.mlp.0.weight"):
        assert decay[name] == 0.04, name
    for name in ("head.mlp.0.bias", "model.norm.weight", "model.blocks.0.norm1.bias"):
        assert decay[name] == 0.0, name


# ---------------------------------------------------------------- MoCo v3's frozen random patch projection


@pytest.mark.parametrize("name,frozen", [("test_vit", True), ("test_vit_convstem", False)])
def test_mocov3_patch_projection_is_random_and_frozen(tmp_path, name, frozen):
    def make():
        torch.manual_seed(0)
        return MoCoV3(create_model(name, num_classes=4), MoCoV3Config(proj_hidden_dim=32, proj_dim=16,
                                                                      pred_hidden_dim=32))

    obj = make()
    proj = obj.model.patch_embed.proj
    before = [p.detach().clone() for p in proj.parameters()]
    tr = make_trainer(tmp_path, objective=obj, dataset=Views(), val_dataset=Views(8, seed=1), transform=None,
                      batch_size=8, optim={"lr": 1e-3}, epochs=1)
    tr.fit()
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    if frozen:  # the paper's trick: not trained, still its random initialisation
        assert not any(id(p) in in_opt for p in proj.parameters())
        assert all(torch.equal(p, b) for p, b in zip(proj.parameters(), before))
        assert all(torch.equal(p, b) for p, b in zip(obj.momentum_encoder.patch_embed.proj.parameters(), before))
    else:  # a conv stem has no patch projection on the pixels: documented no-op
        assert all(id(p) in in_opt for p in proj.parameters())
    assert obj.patch_embed_frozen is frozen and MoCoV3Config().freeze_patch_embed is True


# ---------------------------------------------------------------- 2-process gloo: global counts, DDP


def _patch_logits():
    """Teacher patch logits (4 images, 6 tokens, 5 prototypes) and a mask with no token on rank 1."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4, 6, 5, generator=g)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, 2] = True  # rank 0 holds images 0-1 (5 masked tokens), rank 1 images 2-3 (none)
    return t, mask


def _centre_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from vitkit.engine.distributed import init_distributed, shutdown_distributed, wrap_ddp
    from vitkit.objectives.dino import update_center
    from vitkit.objectives.ibot import sinkhorn_knopp, update_masked_center

    init_distributed("gloo")
    t, mask = _patch_logits()
    rows = slice(rank * 2, rank * 2 + 2)
    c_all, c_masked = torch.zeros(1, 5), torch.zeros(1, 5)
    update_center(c_all, t[rows].mean(1), 0.9)
    update_masked_center(c_masked, t[rows][mask[rows]], 0.9)
    sk = sinkhorn_knopp(t[rows][mask[rows]], 0.1)  # rank 1 has no row: no crash, an empty result
    torch.manual_seed(0)
    obj = DINO(create_model("test_vit", num_classes=4), DINOConfig(**TINY_HEAD))
    obj.freeze()
    ddp = wrap_ddp(obj.train(), torch.device("cpu"), find_unused_parameters=True)
    grads = []
    for _ in range(2):  # the frozen last layer gets no gradient under DDP either, step after step
        ddp(batch(4, seed=rank))["loss"].backward()
        grads.append(obj.head.last_layer.weight_v.grad is None and obj.head.mlp[0].weight.grad is not None)
        obj.zero_grad(set_to_none=True)
    torch.save({"all": c_all, "masked": c_masked, "sk": sk, "grads": torch.tensor(grads)}, f"{out}/rank{rank}.pt")
    shutdown_distributed()


def test_patch_centres_use_global_counts_under_two_process_gloo(tmp_path):
    import torch.multiprocessing as mp
    from helpers import free_port

    t, mask = _patch_logits()
    mp.spawn(_centre_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    for x in r:  # the same centre on every rank: the whole batch's, with its global counts
        torch.testing.assert_close(x["all"], 0.1 * t.mean((0, 1))[None])
        torch.testing.assert_close(x["masked"], 0.1 * t[mask].mean(0)[None])
        assert x["grads"].all()
    assert r[0]["sk"].shape == (5, 5) and r[1]["sk"].shape == (0, 5)
    torch.testing.assert_close(r[0]["sk"].sum(1), torch.ones(5))


def test_masked_objective_on_a_backbone_without_token_path_is_a_clear_error():
    with pytest.raises(TypeError, match="embed"):
        IBOT(create_model("test_resnet", num_classes=4), IBOTConfig(**TINY_HEAD))


def test_last_layer_freeze_ends_by_its_share_of_the_run():
    """DINO freezes the head's last layer for its first epoch (of 100-800: at most 1% of the run); the
    freeze also ends at ``freeze_last_layer_max`` of the run, which a run of the paper's length never reaches."""
    model = create_model("test_vit", num_classes=4)
    obj = DINO(model, DINOConfig(**TINY_HEAD, freeze_last_layer_epochs=1.0))
    obj.freeze_steps.fill_(100)  # one epoch of 100 steps
    obj.step.fill_(10)
    obj.progress.fill_(10 / 10_000)  # a 100-epoch run: 0.1% of it
    assert obj.last_layer_frozen()
    obj.step.fill_(100)
    assert not obj.last_layer_frozen()  # the epoch is over
    obj.step.fill_(10)
    obj.progress.fill_(10 / 200)  # a 2-epoch run: 5% of it already
    assert not obj.last_layer_frozen()
    uncapped = DINO(create_model("test_vit", num_classes=4),
                    DINOConfig(**TINY_HEAD, freeze_last_layer_epochs=1.0, freeze_last_layer_max=1.0))
    uncapped.freeze_steps.fill_(100)
    uncapped.step.fill_(10)
    uncapped.progress.fill_(0.05)
    assert uncapped.last_layer_frozen()
    with pytest.raises(ConfigError, match="freeze_last_layer_max"):
        DINOConfig(freeze_last_layer_max=0)
