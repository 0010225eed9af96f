"""`vitkit zeroshot` and `vitkit retrieve` on a self-describing two-tower weights file: the numbers equal a
computation written here from CLIP's recipe (template embeddings normalised, averaged, renormalised; cosine
ranking), and bad input is one clear line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_user_error, run_vitkit, write_class_folder
from PIL import Image

pytestmark = pytest.mark.e2e

CLASSES = ("red_circle", "green_square", "blue_triangle")
TEMPLATES = ("a photo of a {}.", "a drawing of the {}.")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    try:
        from vitkit.clip import create_clip
    except ImportError as e:
        pytest.skip(f"vitkit.clip is not merged here: {e}")
    from vitkit.weights_io import save_weights

    root = tmp_path_factory.mktemp("zs")
    torch.manual_seed(0)
    model = create_clip("clip_test").eval()
    save_weights(model, root / "clip.safetensors")
    return root / "clip.safetensors"


def _folders(root):
    write_class_folder(root, classes=CLASSES, per_class=3, size=32)
    return root


def test_zeroshot_equals_clip_prompt_ensembling_by_hand(clip_file, tmp_path):
    from vitkit.data import build_dataset
    from vitkit.source import load_clip_model

    data = _folders(tmp_path / "folders")
    (tmp_path / "t.txt").write_text("# my prompts\n" + "\n".join(TEMPLATES) + "\n\n")
    r = run_vitkit("zeroshot", clip_file, "--data", data, "--templates", tmp_path / "t.txt", "--json",
                   "--workers", "0", "--out", tmp_path / "out", check=True)
    res = json.loads(r.stdout)
    assert res["templates"] == list(TEMPLATES) and res["n"] == 9
    assert (tmp_path / "out" / "zeroshot.json").is_file()

    lm = load_clip_model(clip_file, device="cpu")
    m = lm.model
    with torch.no_grad():
        weights = []
        for name in CLASSES:
            t = m.encode_text(m.tokenize([tpl.format(name.replace("_", " ")) for tpl in TEMPLATES]))
            t = t / t.norm(dim=-1, keepdim=True)
            mean = t.mean(0)
            weights.append(mean / mean.norm())
        w = torch.stack(weights)
        hits, counts = torch.zeros(3), torch.zeros(3)
        for split in ("train", "val"):
            ds = build_dataset(str(data), split, val_fraction=0.1, seed=0, in_chans=3)
            for i in range(len(ds)):
                img, label, _ = ds.load(i)
                x = lm.normalize(lm.transform(img)[None])
                f = m.encode_image(x)
                f = f / f.norm(dim=-1, keepdim=True)
                hits[label] += float((f @ w.t()).argmax(1).item() == label)
                counts[label] += 1
    assert res["top1"] == pytest.approx(float(hits.sum() / counts.sum()))
    for k, name in enumerate(CLASSES):
        assert res["per_class"][name] == pytest.approx(float(hits[k] / counts[k]))
    r = run_vitkit("zeroshot", clip_file, "--data", data, "--workers", "0", "--out", tmp_path / "out2", check=True)
    assert "top-1" in r.stdout and "green_square" in r.stdout


def _captions(root, n=8):
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (48, 36), (30 * i, 200 - 20 * i, 60 + 10 * i)).save(root / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "captions": [f"picture number {i}", f"a colour swatch {i}",
                                                              f"tone {i} of the series"]})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "captions.jsonl", rows


def test_retrieve_equals_recall_by_hand(clip_file, tmp_path):
    from vitkit.data.captions import CaptionTransform
    from vitkit.source import load_clip_model

    listing, rows = _captions(tmp_path / "cap")
    r = run_vitkit("retrieve", clip_file, "--data", listing, "--k", "1,3", "--json", "--workers", "0",
                   "--out", tmp_path, check=True)
    res = json.loads(r.stdout)
    assert res["n_images"] == 8 and res["n_texts"] == 24

    lm = load_clip_model(clip_file, device="cpu")
    m = lm.model
    tf = CaptionTransform(lm.transform.size[0], train=False)
    import random

    with torch.no_grad():
        imgs, texts, owner = [], [], []
        for j, row in enumerate(rows):
            img = Image.open(listing.parent / row["image"]).convert("RGB")
            out = tf(img, {"captions": row["captions"], "label": None, "image_id": j}, random.Random(0))
            f = m.encode_image(lm.normalize(out["image"][None]))
            imgs.append(f / f.norm(dim=-1, keepdim=True))
            texts += row["captions"]
            owner += [j] * len(row["captions"])
        img = torch.cat(imgs)
        t = m.encode_text(m.tokenize(texts))
        t = t / t.norm(dim=-1, keepdim=True)
    sim = img @ t.t()  # (images, texts)
    owner = torch.tensor(owner)
    for k in (1, 3):
        top_texts = sim.topk(k, dim=1).indices  # image -> text: any own caption among the top k
        i2t = sum(bool((owner[top_texts[j]] == j).any()) for j in range(len(rows))) / len(rows)
        top_images = sim.t().topk(k, dim=1).indices  # text -> image: its own image among the top k
        t2i = sum(bool((top_images[q] == owner[q]).any()) for q in range(len(texts))) / len(texts)
        assert res[f"i2t_r{k}"] == pytest.approx(i2t) and res[f"t2i_r{k}"] == pytest.approx(t2i)


def test_bad_input_is_one_clear_line(clip_file, tmp_path):
    from vitkit.models import create_model
    from vitkit.weights_io import save_weights

    data = _folders(tmp_path / "folders")
    classifier = save_weights(create_model("test_vit", num_classes=3), tmp_path / "cls.safetensors")
    assert_user_error(run_vitkit("zeroshot", classifier, "--data", data), "not an image-text")
    assert_user_error(run_vitkit("retrieve", clip_file, "--data", data), "no captions")
    (tmp_path / "bad.txt").write_text("a photo\n")
    assert_user_error(run_vitkit("zeroshot", clip_file, "--data", data, "--templates", tmp_path / "bad.txt"), "{}")
    assert_user_error(run_vitkit("zeroshot", tmp_path / "nope", "--data", data), "no such file")
    assert_user_error(run_vitkit("retrieve", clip_file, "--data", tmp_path / "nope.jsonl"), "no such file")
    listing, _ = _captions(tmp_path / "cap")
    assert_user_error(run_vitkit("retrieve", clip_file, "--data", listing, "--k", "0,x"), "--k")


@pytest.mark.peer("open_clip")
def test_zeroshot_reads_an_open_clip_folder_as_open_clip_classifies(tmp_path):
    """open_clip's hub layout through `vitkit zeroshot`: the predictions open_clip itself makes (its encoders,
    its tokenizer, OpenAI's normalisation) on the images as vitkit's evaluation transform crops them."""
    from helpers import require_peer
    from test_clip_open_clip import CLIP_CFG, _open_clip_folder

    from vitkit.source import load_clip_model

    open_clip = require_peer("open_clip")
    ref, folder = _open_clip_folder(tmp_path, CLIP_CFG)
    data = _folders(tmp_path / "folders")
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    r = run_vitkit("zeroshot", folder, "--data", data, "--templates", tmp_path / "t.txt", "--json", "--workers", "0",
                   "--out", tmp_path / "out", check=True)
    res = json.loads(r.stdout)
    lm = load_clip_model(folder, device="cpu")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    from vitkit.data import build_dataset

    with torch.no_grad():
        w = []
        for name in CLASSES:
            t = ref.encode_text(open_clip.tokenize([tpl.format(name.replace("_", " ")) for tpl in TEMPLATES],
                                                   context_length=16), normalize=True)
            w.append(torch.nn.functional.normalize(t.mean(0), dim=0))
        w = torch.stack(w)
        hits = n = 0
        for split in ("train", "val"):
            ds = build_dataset(str(data), split, val_fraction=0.1, seed=0, in_chans=3)
            for i in range(len(ds)):
                img, label, _ = ds.load(i)
                x = (lm.transform(img)[None].float() / 255 - mean) / std
                f = ref.encode_image(x, normalize=True)
                # what vitkit scores with: the same embedding, its own normalisation of the same crop
                assert (lm.image_embeds(lm.transform(img)[None]) - f).abs().max() < 1e-5
                hits += int((f @ w.t()).argmax(1).item() == label)
                n += 1
    assert res["n"] == n and res["top1"] == pytest.approx(hits / n)
    assert (lm.text_embeds([TEMPLATES[0].format("red circle")])
            - ref.encode_text(open_clip.tokenize([TEMPLATES[0].format("red circle")], context_length=16),
                              normalize=True)).abs().max() < 1e-5
