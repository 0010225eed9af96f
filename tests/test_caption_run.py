"""Image-text runs: the caption plan's rules, chance recall, then (with the two-tower model, the objectives
and the caption data) `vitkit train --data shapes-captions` end to end, with weights that rebuild the model
from the file alone and feed `vitkit zeroshot` and `vitkit retrieve`; bad input as one clear line."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from helpers import assert_user_error, run_vitkit, write_class_folder

from vitkit.evaluate_caption import chance_recall, class_prompt_name
from vitkit.plan_caption import (
    BUDGET_IMAGES,
    CAPTION_EVALS,
    END_ON_BEST_MIN_VAL,
    EVAL_COST,
    LR_256,
    MAX_BATCH,
    MIN_BATCH,
    MIN_STEPS,
    SCALE_MIN,
    SIDED_MAX,
    CaptionCalibration,
    CaptionChoice,
    CaptionInfo,
    caption_budget_s,
    make_caption_plan,
    planned_caption_batch,
    siglip_prior_bias,
)
from vitkit.plan_eval import CAP_FACTOR, CAP_MIN_EPOCHS

FAST = ["data.num_workers=0", "engine.tensorboard=false"]


def _info(n=2000, classes=()):
    return CaptionInfo(typical_size=(64, 64), n_train=n, n_val=n // 10, captions_per_image=5.0, caption_words=11.0,
                       classes=tuple(classes), format="jsonl", reason="captions in captions.jsonl")


def _calib(device="cpu", rate=100.0):
    return CaptionCalibration(device, {"clip_nano": rate}, 0.001, eval_img_per_s={"clip_nano": 3 * rate},
                              img_size=64, params=5_000_000)


CHOICE = CaptionChoice("clip_nano", None, 64, "clip", "test")


# ---- the plan: pure rules on made-up statistics -------------------------------------------------------------


def test_planned_batch_keeps_min_steps_per_epoch_within_bounds():
    for n in (10, 100, 640, 5000, 10**6):
        b = planned_caption_batch(n, "cpu")
        assert MIN_BATCH <= b <= MAX_BATCH["cpu"] and b & (b - 1) == 0
        if MIN_BATCH < b < MAX_BATCH["cpu"]:
            assert n // b >= MIN_STEPS and n // (2 * b) < MIN_STEPS  # the largest power of two that keeps them
    assert planned_caption_batch(10**6, "cuda") == MAX_BATCH["cuda"]


def test_cpu_plan_budgets_time_and_keeps_captions_true_to_the_image():
    plan = make_caption_plan(_info(700), _calib(), {}, CHOICE)
    v = plan.values
    assert v["engine.time_budget"] == "15m" and caption_budget_s(700) == 900
    assert caption_budget_s(4 * BUDGET_IMAGES) == 3600 and caption_budget_s(10**7) == 3600
    assert v["data.scale_min"] == SCALE_MIN
    assert v["optim.betas"] == (0.9, 0.98) and v["optim.eps"] == 1e-6 and v["optim.weight_decay"] == 0.2
    assert v["objective.name"] == "clip" and v["model.name"] == "clip_nano"
    batch = v["data.batch_size"]
    assert batch == planned_caption_batch(700, "cpu")
    # square-root scaling from LR_256 at 256, stored per 512
    assert math.isclose(v["optim.lr"] * batch / 512, LR_256 * math.sqrt(batch / 256), rel_tol=1e-2)
    # epochs: rate x 90% of the budget / n, decode counted in series; the plan caps them at CAP_FACTOR x
    rate = 1 / (1 / 100.0 + 0.001)
    assert v["engine.epochs"] == max(CAP_MIN_EPOCHS, math.ceil(CAP_FACTOR * rate * 0.9 * 900 / 700))


def test_plan_flips_only_where_the_captions_hardly_name_a_side():
    for sided, want in ((0.0, 0.5), (SIDED_MAX / 2, 0.5), (SIDED_MAX, 0.0), (0.2, 0.0)):
        info = _info(700)
        info.sided_captions = sided
        plan = make_caption_plan(info, _calib(), {}, CHOICE)
        assert plan.values["data.hflip"] == want, sided
        assert f"{sided:.1%}" in plan.reasons["data.hflip"]
    assert "data.hflip" not in make_caption_plan(_info(700), _calib(), {"data.hflip": 0.0}, CHOICE).values


def test_small_caption_sets_are_evaluated_often_and_end_on_their_best():
    plan = make_caption_plan(_info(700), _calib(), {}, CHOICE)  # 70 validation images, ~105 epochs in 15 min
    v = plan.values
    epochs = 1 / (1 / 100.0 + 0.001) * 0.9 * 900 / 700
    assert v["engine.eval_every"] == math.floor(epochs / CAPTION_EVALS)
    # An evaluation of 70 images x 5 captions at 300 pairs/s: 20 of them are ~2% of the 15 minutes.
    assert "~1.2 s each" in plan.reasons["engine.eval_every"]
    # 70 are too few to choose among evaluations: the run keeps its last weights.
    assert END_ON_BEST_MIN_VAL > 70 and "engine.end_on_best" not in v
    assert any("keeps its last weights" in n for n in plan.notes)
    enough = _info(700)
    enough.n_val = END_ON_BEST_MIN_VAL
    assert make_caption_plan(enough, _calib(), {}, CHOICE).values["engine.end_on_best"] is True
    # Evaluations that would take over EVAL_COST of the run keep the plan's midway one.
    slow = CaptionCalibration("cpu", {"clip_nano": 100.0}, 0.001, eval_img_per_s={"clip_nano": 1.0}, img_size=64)
    v = make_caption_plan(_info(700), slow, {}, CHOICE).values
    assert v["engine.eval_every"] == math.ceil(epochs / 2)
    assert CAPTION_EVALS * 70 * 5 / 1.0 > EVAL_COST * 900
    user = {"engine.eval_every": 3, "engine.end_on_best": False}
    v = make_caption_plan(enough, _calib(), user, CHOICE).values
    assert "engine.eval_every" not in v and "engine.end_on_best" not in v


def test_plan_keeps_user_keys_and_names_siglip_for_siglip_models():
    user = {"data.batch_size": 32, "engine.time_budget": "2m", "model.name": "siglip_nano"}
    choice = CaptionChoice("siglip_nano", None, 64, "siglip", "test")
    v = make_caption_plan(_info(), _calib(), user, choice, finetune=True).values
    assert not set(user) & set(v)
    assert v["objective.name"] == "siglip"
    assert "from a pretrained image tower" in make_caption_plan(_info(), _calib(), user, choice, True).reasons["optim.lr"]


def test_siglip_bias_starts_at_the_prior_log_odds_of_the_global_batch():
    """SigLIP's -10 is the log-odds of a positive pair at its 32k batch; the plan applies the same rule to the
    run's global batch (per-device batch x processes), and keeps a bias the user set."""
    def log_odds(b):  # P(positive) = 1/B among the B texts an image is scored against
        p = 1.0 / b
        return math.log(p / (1.0 - p))

    assert round(log_odds(32768)) == -10 and math.isclose(siglip_prior_bias(32768), log_odds(32768))
    choice = CaptionChoice("siglip_nano", None, 64, "siglip", "test")
    for world in (1, 4):
        plan = make_caption_plan(_info(), _calib(), {}, choice, world_size=world)
        batch = plan.values["data.batch_size"]
        assert math.isclose(plan.values["model.head_args.init_logit_bias"], log_odds(batch * world), abs_tol=1e-3)
        assert f"global batch of {batch * world}" in plan.reasons["model.head_args.init_logit_bias"]
    assert "model.head_args.init_logit_bias" not in make_caption_plan(_info(), _calib(), {}, CHOICE).values  # CLIP
    for key in ("model.head_args", "model.args"):
        user = {key: {"init_logit_bias": -10.0}}
        assert "model.head_args.init_logit_bias" not in make_caption_plan(_info(), _calib(), user, choice).values


def test_gpu_plan_counts_epochs_not_time():
    v = make_caption_plan(_info(100_000), _calib("cuda"), {}, CHOICE).values
    assert "engine.time_budget" not in v and v["engine.epochs"] == 20
    assert v["data.batch_size"] == MAX_BATCH["cuda"]


def test_chance_recall_matches_enumeration():
    """Text->image: k of n images; image->text: any of c captions among k texts drawn from m (all subsets counted)."""
    n_images, c = 4, 2
    m = n_images * c
    for k in (1, 2, 3):
        hits = sum(any(t < c for t in subset) for subset in itertools.combinations(range(m), k))
        i2t, t2i = chance_recall(n_images, m, c, k)
        assert math.isclose(i2t, hits / math.comb(m, k))
        assert math.isclose(t2i, k / n_images)


def test_folder_names_become_prompt_words():
    assert class_prompt_name("pickup_truck") == "pickup truck"
    assert class_prompt_name("sea-lion") == "sea lion"


# ---- end to end (needs the two-tower model, the clip/siglip objectives and the caption data) ----------------


def _needs_caption_stack():
    try:
        from vitkit.clip import create_clip  # noqa: F401
        from vitkit.data.captions import CaptionTransform  # noqa: F401
        from vitkit.objectives import list_objectives
    except ImportError as e:
        pytest.skip(f"the caption stack is not merged here: {e}")
    if "clip" not in list_objectives():
        pytest.skip("the clip objective is not merged here")


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """`vitkit train --data shapes-captions:64` on the tiny clip_test model, a few steps (shared below)."""
    _needs_caption_stack()
    root = tmp_path_factory.mktemp("caption")
    r = run_vitkit("train", "--data", "shapes-captions:64", "--out", root / "run", "model.name=clip_test",
                   "engine.time_budget=60s", "engine.max_steps=4", "data.batch_size=16", *FAST, check=True,
                   timeout=300)
    return root, r


@pytest.mark.e2e
def test_train_on_shapes_captions_writes_a_self_describing_run(clip_run, tmp_path):
    from vitkit.source import load_clip_model
    from vitkit.weights_io import read_state_dict

    root, r = clip_run
    run = root / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["task"] == "caption" and info["model"] == "clip_test" and info["objective"]["name"] == "clip"
    assert info["classes"] and info["tokenizer"]
    vals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = [v for v in vals if v.get("kind") == "val"][-1]
    for key in ("i2t_r1", "t2i_r5", "r_mean", "zeroshot_acc1"):
        assert 0.0 <= val[key] <= 1.0, key
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_metric"] == "r_mean" and summary["task"] == "caption"
    # The weights file alone rebuilds the model (config and tokenizer in its metadata): copied out of the run.
    lone = tmp_path / "clip.safetensors"
    lone.write_bytes((run / "model.safetensors").read_bytes())
    lm = load_clip_model(lone, device="cpu")
    saved, _ = read_state_dict(run / "model.safetensors")
    state = lm.model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert lm.task == "caption" and lm.transform.size == (info["img_size"], info["img_size"])
    tokens = lm.model.tokenize(["a red circle on a blue background"])
    assert tokens.dtype == torch.long and tokens.shape[0] == 1
    # A checkpoint's weights carry no description: the run's final file rebuilds the model, the checkpoint's
    # tensors fill it (here the last checkpoint, whose tensors are the final ones).
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    from_ckpt = load_clip_model(ckpt, device="cpu")
    ckpt_sd, _ = read_state_dict(ckpt / "model.safetensors")
    assert all(torch.equal(ckpt_sd[k], v) for k, v in from_ckpt.model.state_dict().items())
    assert from_ckpt.weights == ckpt / "model.safetensors" and from_ckpt.task == "caption"
    # Outputs about a checkpoint (retrieve.json, zeroshot.json) go next to it, not over the run's own.
    assert from_ckpt.home == ckpt.resolve() and load_clip_model(run, device="cpu").home == run
    assert load_clip_model(ckpt / "model.safetensors", device="cpu").home == ckpt.resolve()


@pytest.mark.e2e
def test_zeroshot_and_retrieve_on_the_run(clip_run, tmp_path):
    root, _ = clip_run
    run = root / "run"
    write_class_folder(tmp_path / "folders", classes=("circle", "square", "triangle"), per_class=4, size=32)
    r = run_vitkit("zeroshot", run, "--data", tmp_path / "folders", "--json", "--workers", "0", check=True)
    res = json.loads(r.stdout)
    assert res["n"] == 12 and res["classes"] == ["circle", "square", "triangle"]
    assert 0 <= res["top1"] <= res["top5"] <= 1 and set(res["per_class"]) == set(res["classes"])
    r = run_vitkit("zeroshot", run, "--data", "shapes-captions:64", "--split", "val", "--workers", "0", check=True)
    assert "top-1" in r.stdout and "per class" in r.stdout
    lines = [{"image": f"images/{i}.png", "captions": [f"picture {i}", f"photo number {i}"]} for i in range(6)]
    (tmp_path / "cap" / "images").mkdir(parents=True)
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (40, 30), (40 * i, 255 - 40 * i, 90)).save(tmp_path / "cap" / "images" / f"{i}.png")
    (tmp_path / "cap" / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = run_vitkit("retrieve", run, "--data", tmp_path / "cap" / "captions.jsonl", "--k", "1,5", "--workers", "0",
                   "--out", tmp_path / "out", check=True)
    assert "image->text" in r.stdout and "R@5" in r.stdout
    res = json.loads((tmp_path / "out" / "retrieve.json").read_text())
    assert res["n_images"] == 6 and res["n_texts"] == 12 and res["chance"]["t2i_r5"] == pytest.approx(5 / 6)
    # A classifier's commands point at these two instead of failing inside.
    assert_user_error(run_vitkit("eval", run, "--data", tmp_path / "folders"), "image-text", "vitkit zeroshot")


@pytest.mark.e2e
def test_trained_tokenizer_and_a_siglip_head_around_a_backbone(tmp_path):
    _needs_caption_stack()
    out = tmp_path / "run"
    run_vitkit("train", "--data", "shapes-captions:64", "--out", out, "model.name=test_vit", "model.head=siglip",
               "model.head_args.tokenizer=trained", "model.head_args.vocab_size=300",
               "model.head_args.text.width=32", "model.head_args.text.depth=1", "model.head_args.text.num_heads=2",
               "model.head_args.embed_dim=32", "engine.max_steps=2", "data.batch_size=16", "engine.epochs=1",
               *FAST, check=True, timeout=300)
    info = json.loads((out / "run.json").read_text())
    assert info["objective"]["name"] == "siglip" and info["head"] == "siglip"
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    from vitkit.source import load_clip_model
    from vitkit.text import load_tokenizer

    lm = load_clip_model(out / "model.safetensors", device="cpu")
    saved = load_tokenizer(str(out / "tokenizer"))
    assert lm.model.text.vocab_size == saved.vocab_size <= 300  # the text tower is sized by the trained vocabulary
    caption = "a small red circle on a gray background"
    assert torch.equal(lm.model.tokenize([caption]), saved([caption]))
    assert lm.model.logit_bias is not None
    # the plan started the bias at the log-odds of a positive pair in a batch of 16 (-ln 15), not the paper's -10
    assert info["model_args"]["init_logit_bias"] == pytest.approx(-math.log(15), abs=1e-3)
    assert abs(float(lm.model.logit_bias) + math.log(15)) < 0.1  # two small steps from there


@pytest.mark.e2e
def test_bad_input_is_one_clear_line(tmp_path):
    _needs_caption_stack()
    r = run_vitkit("train", "--data", "shapes:40", "--out", tmp_path / "a", "model.head=clip", *FAST)
    assert_user_error(r, "model.head=clip", "captions")
    r = run_vitkit("train", "--data", "shapes-captions:32", "--out", tmp_path / "b", "model.name=test_vit", *FAST)
    assert_user_error(r, "not a two-tower model", "model.head=clip")
    r = run_vitkit("train", "--data", "shapes-captions:32", "--out", tmp_path / "c", "model.name=clip_test",
                   "objective.name=supervised", *FAST)
    assert_user_error(r, "objective.name=supervised", "clip or siglip")
    r = run_vitkit("train", "--data", "shapes-captions:32", "--out", tmp_path / "d", "model.name=clip_test",
                   "model.head_args.tokenizer=wordpiece", *FAST)
    assert_user_error(r, "model.head_args.tokenizer")


def test_model_init_fills_the_image_tower_only(tmp_path):
    """model.head=clip around a backbone with model.init: the tower holds the file's weights (its classifier
    dropped), the text tower and the projections start fresh."""
    _needs_caption_stack()
    from vitkit.config import load_config
    from vitkit.models import create_model
    from vitkit.plan_caption import CaptionChoice
    from vitkit.train_caption import build_two_tower
    from vitkit.weights_io import read_state_dict, save_weights

    torch.manual_seed(0)
    save_weights(create_model("test_vit", num_classes=5), tmp_path / "tower.safetensors")
    cfg = load_config(None, ["data.path=shapes-captions:32", "model.name=test_vit", "model.head=clip",
                             f"model.init={tmp_path / 'tower.safetensors'}", "model.head_args.embed_dim=16",
                             "model.head_args.text.width=32", "model.head_args.text.depth=1",
                             "model.head_args.text.num_heads=2"], plan=False)
    model, tokenizer = build_two_tower(CaptionChoice("test_vit", "clip", 32, "clip", ""), cfg, data=None,
                                       verbose=False)
    saved, _ = read_state_dict(tmp_path / "tower.safetensors")
    tower = model.visual.state_dict()
    assert tokenizer is None and model.embed_dim == 16 and model.visual.num_classes == 0
    assert set(tower) == {k for k in saved if not k.startswith("head.")}
    assert all(torch.equal(tower[k], saved[k]) for k in tower)


def test_model_args_of_a_registered_two_tower_model_reach_it():
    """model.args on a registered clip_*/siglip_* model override its arguments (as model.head_args do),
    rather than being dropped."""
    _needs_caption_stack()
    from vitkit.config import load_config
    from vitkit.plan_caption import CaptionChoice
    from vitkit.train_caption import build_two_tower

    cfg = load_config(None, ["data.path=shapes-captions:32", "model.name=siglip_test",
                             "model.args.init_logit_bias=-2.5", "model.head_args.init_logit_scale=1.0"], plan=False)
    model, _ = build_two_tower(CaptionChoice("siglip_test", None, 32, "siglip", ""), cfg, data=None, verbose=False)
    assert model.logit_bias.item() == -2.5 and model.logit_scale.item() == 1.0
