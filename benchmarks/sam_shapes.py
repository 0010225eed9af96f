"""Promptable segmentation: the small SAM trained on the built-in multi-instance scenes, scored on
held-out scenes and zero-shot on CamVid objects.

The model trains as ``vitkit train --data scenes:N --task promptable model.name=sam_nano`` does (through
``vitkit.train``, the function that command calls) under a wall-clock budget, with the recipe vitkit gives
promptable runs (SAM's: AdamW at 8e-4 after 250 warmup steps, 11 prompt rounds per instance; see
``vitkit.train_promptable.apply_sam_recipe``); ``--iters`` sets the rounds and ``--init`` starts the image
encoder from other weights (a vitkit MAE run, as SAM starts from MAE). Scores are computed here in numpy from the model's masks at
the original resolution, one prompt per instance: the point farthest from the instance's boundary
(SAM's evaluation click) and the tight box; ``*_miou`` keeps the mask with the highest predicted
IoU, ``point_miou_oracle`` the best of the three. ``auto_recall`` is the share of ground-truth
instances matched at IoU >= 0.5 by an automatic mask (``vitkit.sam.generate_masks`` with SAM's
default filters, set for ViT-H); ``auto`` adds the same share without filters, among the top 8 and
32 masks by predicted IoU after NMS and among all of them. CamVid objects
are the 4-connected components of at least 50 pixels of the car and pedestrian classes in the val
masks; the box-fill baseline scores the tight box itself as the mask. ``encoder_ms`` /
``decoder_ms`` time one image embedding and one prompt's decoding (random weights, time only) for
the trained model and for ``sam_vit_b`` at 1024 px.

    python benchmarks/sam_shapes.py                 # 20 min budget
    python benchmarks/sam_shapes.py --smoke         # under a minute: a few steps, a few images, no vit_b
    python benchmarks/sam_shapes.py --init runs/mae-scenes   # the encoder from an MAE run
    python benchmarks/sam_shapes.py --eval-run runs/sam-shapes-s7 --camvid-split train   # score a run again

Writes ``benchmarks/results/sam.json`` and ``sam_overlay.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from segment_camvid import camvid_root

from _common import RESULTS, machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
CAMVID_OBJECTS = {"car": 8, "pedestrian": 9}
MIN_AREA = 50


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def tight_box(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def box_fill(m: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = tight_box(m).astype(int)
    out = np.zeros_like(m)
    out[y0:y1 + 1, x0:x1 + 1] = True
    return out


def components(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """4-connected components of ``mask`` with at least ``min_area`` pixels (an iterative flood fill)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for y0, x0 in np.argwhere(mask):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        if len(pix) >= min_area:
            comp = np.zeros_like(mask)
            comp[tuple(np.array(pix).T)] = True
            out.append(comp)
    return out


@torch.no_grad()
def prompt_masks(model, image: np.ndarray, masks: list[np.ndarray]) -> list[dict]:
    """Per instance: IoU of the top mask for the center click, of the best of three, and of the top box mask."""
    from vitkit.sam.prompts import center_point

    x, input_size, original_size = model.preprocess(image)
    emb = model.encode_image(x)
    rows = []
    for m in masks:
        pt = center_point(torch.from_numpy(m)).view(1, 1, 2)
        coords = model.transform_coords(pt, original_size)
        box = model.transform_coords(torch.from_numpy(tight_box(m)).view(1, 2, 2), original_size).view(1, 4)
        row = {}
        for key, kw in (("point", {"points": (coords, torch.ones(1, 1, dtype=torch.long))}), ("box", {"boxes": box})):
            low, pred_iou = model.decode(emb, multimask=True, **kw)
            full = model.postprocess_masks(low, input_size, original_size)[0] > model.mask_threshold
            ious = [iou(full[k].numpy(), m) for k in range(full.shape[0])]
            top = int(pred_iou[0].argmax())
            row[key] = ious[top]
            row[f"{key}_mask"] = full[top].numpy()
            if key == "point":
                row["point_oracle"], row["point_xy"] = max(ious), pt.view(2).tolist()
        rows.append(row)
    return rows


AUTO_TOP_K = (8, 32)


def auto_recall(model, image: np.ndarray, masks: list[np.ndarray]) -> dict | None:
    """Shares of the ground-truth instances matched at IoU >= 0.5 by automatic masks: with SAM's default
    filters (``default``: predicted IoU > 0.88, stability >= 0.95, set for ViT-H), and without filters
    (a 16x16 point grid, box NMS at 0.7, then the ``top<K>`` masks by predicted IoU, or ``all``);
    ``n_masks``: the unfiltered masks left after NMS."""
    try:
        from vitkit.sam.auto import generate_masks
    except ImportError:
        return None
    if not masks:
        return None

    def recall(found: list[np.ndarray]) -> float:
        return float(np.mean([any(iou(f, m) >= 0.5 for f in found) for m in masks]))

    default = [r["segmentation"] for r in generate_masks(model, image)]
    every = sorted(generate_masks(model, image, points_per_side=16, pred_iou_thresh=0.0, stability_score_thresh=0.0),
                   key=lambda r: -r["predicted_iou"])
    found = [r["segmentation"] for r in every]
    return {"default": recall(default), **{f"top{k}": recall(found[:k]) for k in AUTO_TOP_K}, "all": recall(found),
            "n_masks": len(found)}


def shapes_scores(model, n_val: int, img_size: int, with_auto: bool) -> tuple[dict, list]:
    from vitkit.data.scenes import ScenesDataset

    ds = ScenesDataset(n_val, split="val", seed=0, img_size=img_size, task="promptable")
    rows, recalls, shown = [], [], []
    for i in range(len(ds)):
        out = ds.render(i)
        masks = list(out["instance_masks"])
        if not masks:
            continue
        r = prompt_masks(model, out["image"], masks)
        rows += r
        if with_auto:
            rec = auto_recall(model, out["image"], masks)
            if rec is not None:
                recalls.append((rec, len(masks)))
        if len(shown) < 4:
            shown.append((out["image"], r))
    scores = {k: float(np.mean([r[k] for r in rows])) for k in ("point", "point_oracle", "box")}
    auto = None
    if recalls:
        total = sum(n for _, n in recalls)
        auto = {k: float(sum(a[k] * n for a, n in recalls) / total) for k in recalls[0][0] if k != "n_masks"}
        auto["masks_per_image"] = float(np.mean([a["n_masks"] for a, _ in recalls]))
    return {"point_miou": scores["point"], "point_miou_oracle": scores["point_oracle"], "box_miou": scores["box"],
            "auto_recall": auto and auto["default"], "auto": auto, "n_instances": len(rows)}, shown


def camvid_scores(model, root: Path, max_images: int | None, split: str = "val") -> dict:
    """Zero-shot on CamVid's car and pedestrian components; besides the scores, what tells an empty mask
    from a spilling one: the point masks' area over the true area (median), the share of empty point
    masks, and the best-of-three point score."""
    imgs = sorted((root / split).glob("*.jpg"))[:max_images]
    rows, fill, areas = [], [], []
    for p in imgs:
        image = np.asarray(Image.open(p).convert("RGB"))
        label = np.asarray(Image.open(root / f"{split}annot" / f"{p.stem}.png"))
        masks = [c for cls in CAMVID_OBJECTS.values() for c in components(label == cls, MIN_AREA)]
        if masks:
            got = prompt_masks(model, image, masks)
            rows += got
            fill += [iou(box_fill(m), m) for m in masks]
            areas += [(float(r["point_mask"].sum()), float(m.sum())) for r, m in zip(got, masks)]
    if not rows:
        return {"point_miou": None, "box_miou": None, "box_fill_miou": None, "n": 0, "split": split}
    ratio = [a / t for a, t in areas]
    return {"point_miou": float(np.mean([r["point"] for r in rows])), "box_miou": float(np.mean([r["box"] for r in rows])),
            "box_fill_miou": float(np.mean(fill)), "n": len(rows), "split": split,
            "point_miou_oracle": float(np.mean([r["point_oracle"] for r in rows])),
            "point_area_ratio_median": float(np.median(ratio)),
            "point_empty_share": float(np.mean([a == 0 for a, _ in areas]))}


def train_run(data: str, run: Path, overrides: list[str]) -> dict:
    """``vitkit.train`` as ``vitkit train --data DATA --task promptable model.name=sam_nano --out RUN`` runs it."""
    from vitkit.config import load_config
    from vitkit.train import train

    keys = [f"data.path={data}", "data.task=promptable", "model.name=sam_nano", f"engine.out_dir={run}", *overrides]
    t0 = time.time()
    summary = train(load_config(overrides=keys), verbose=False)
    return {"wall_s": time.time() - t0, "summary": summary, "run_info": json.loads((run / "run.json").read_text()),
            "command": "vitkit train --data {} --task promptable --out {} {}".format(data, run, " ".join(keys[4:]))}


@torch.no_grad()
def timing(model, reps: int) -> dict:
    s = model.img_size
    x = torch.randn(1, 3, s, s)
    emb = model.encode_image(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        model.encode_image(x)
    enc = (time.perf_counter() - t0) / reps * 1000
    pts = (torch.tensor([[[s / 2, s / 2]]]), torch.ones(1, 1, dtype=torch.long))
    model.decode(emb, points=pts, multimask=True)
    t0 = time.perf_counter()
    for _ in range(reps * 5):
        model.decode(emb, points=pts, multimask=True)
    dec = (time.perf_counter() - t0) / (reps * 5) * 1000
    return {"encoder_ms": enc, "decoder_ms": dec, "ratio": dec / enc}


def overlay(shown: list, path: Path) -> None:
    tiles = []
    for image, rows in shown:
        img = Image.fromarray(image).convert("RGBA")
        layer = np.zeros((*image.shape[:2], 4), np.uint8)
        rng = np.random.default_rng(0)
        for r in rows:
            layer[r["point_mask"]] = (*rng.integers(60, 255, 3), 140)
        img = Image.alpha_composite(img, Image.fromarray(layer))
        draw = ImageDraw.Draw(img)
        for r in rows:
            x, y = r["point_xy"]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 255, 0, 255), outline=(0, 0, 0, 255))
        tiles.append(img.convert("RGB"))
    if not tiles:
        return
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * len(tiles), h))
    for k, t in enumerate(tiles):
        sheet.paste(t, (k * w, 0))
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="20m")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--camvid-images", type=int, default=None, help="val images scored (default: all)")
    ap.add_argument("--data", default=None, help="an extracted camvid/ folder (default: the shared archive)")
    ap.add_argument("--iters", type=int, default=None,
                    help="prompt rounds per instance (objective.iters; default the paper's 11)")
    ap.add_argument("--init", default=None, help="model.init: ViT weights for the image encoder, e.g. a vitkit MAE run "
                    "of sam_nano's encoder (width 192, depth 6, 3 heads, patch 8, 128 px), or SAM weights")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides")
    ap.add_argument("--camvid-split", default="val", choices=["val", "train"],
                    help="the CamVid split scored zero-shot (val: the result; train: for screening recipes)")
    ap.add_argument("--eval-run", default=None, help="score this finished run instead of training one (a diagnosis: "
                                                     "writes beside the run, not to results/)")
    ap.add_argument("--smoke", action="store_true", help="a check of the script in under a minute")
    ap.add_argument("--run-root", default=None)
    ap.add_argument("--out", default="sam.json")
    args = ap.parse_args()
    from vitkit.engine.budget import parse_duration
    from vitkit.sam import create_sam, load_sam

    overrides = list(args.set)
    if args.iters is not None:
        overrides.append(f"objective.iters={args.iters}")
    if args.init:
        overrides.append(f"model.init={args.init}")
    if args.smoke:
        args.budget, args.n_train, args.n_val, args.camvid_images = "15s", 16, 2, 1
        overrides += ["engine.max_steps=3", "objective.name=sam", "objective.iters=2", "objective.mask_only_rounds=1",
                      "data.batch_size=2", "data.num_workers=0", "engine.eval_every=1000"]
    t0 = time.time()
    if args.eval_run:
        run = Path(args.eval_run)
        tr = {"wall_s": None, "command": None, "summary": json.loads((run / "summary.json").read_text()),
              "run_info": json.loads((run / "run.json").read_text())}
    else:
        run = Path(args.run_root or REPO / "runs" / f"sam-shapes-{time.strftime('%Y%m%d-%H%M%S')}")
        tr = train_run(f"scenes:{args.n_train}", run, [f"engine.time_budget={args.budget}", *overrides])
    model = load_sam(str(run)).eval()
    shapes, shown = shapes_scores(model, args.n_val, args.img_size, with_auto=not args.smoke)
    camvid = camvid_scores(model, camvid_root(args.data), args.camvid_images, args.camvid_split)
    small = timing(model, 1 if args.smoke else 10)
    big = None if args.smoke or args.eval_run else timing(create_sam("sam_vit_b").eval(), 3)
    summary, run_info = tr["summary"], tr["run_info"]
    result = {
        "benchmark": "sam_shapes", "shapes": shapes, "camvid_objects": camvid,
        "encoder_ms": {"sam_nano": small["encoder_ms"], "sam_vit_b": big and big["encoder_ms"]},
        "decoder_ms": {"sam_nano": small["decoder_ms"], "sam_vit_b": big and big["decoder_ms"]},
        "decoder_encoder_ratio": {"sam_nano": small["ratio"], "sam_vit_b": big and big["ratio"]},
        "model": run_info.get("model"), "img_size": run_info.get("img_size"), "objective": run_info.get("objective"),
        "budget_s": parse_duration(args.budget), "n_train": args.n_train, "n_val": args.n_val,
        "steps": summary.get("steps"), "epochs": summary.get("epochs"), "base_lr": summary.get("base_lr"),
        "init": args.init, "wall_s": time.time() - t0,
        "train_wall_s": tr["wall_s"], "command": tr["command"], "run_dir": str(run), "smoke": args.smoke,
        "protocol": "one prompt per instance at original resolution: the point farthest from the boundary, the "
                    "tight box; top predicted-IoU mask (oracle: best of 3); CamVid car+pedestrian 4-connected "
                    f"components >= {MIN_AREA} px of the val masks",
        "machine": machine(), "versions": versions(),
    }
    if args.smoke or args.eval_run or args.camvid_split != "val":  # a check or a diagnosis: it stays beside its run
        tag = "smoke" if args.smoke else f"eval_{args.camvid_split}"
        path = run / f"sam_{tag}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        overlay(shown, run / f"sam_{tag}_overlay.png")
    else:
        path = write_json(args.out, result)
        overlay(shown, RESULTS / "sam_overlay.png")
    print(f"shapes point mIoU {shapes['point_miou']:.3f} (oracle {shapes['point_miou_oracle']:.3f}), box "
          f"{shapes['box_miou']:.3f}; camvid {camvid}; wrote {path}")


if __name__ == "__main__":
    main()
