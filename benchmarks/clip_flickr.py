"""Image-text retrieval on Flickr800 (800 photos, 5 captions each): CLIP from scratch vs from a vitkit image tower.

Held-out rule (shared with ``benchmarks/vlm_connector.py``): the image names of ``captions.jsonl``
sorted, the validation images are ``random.Random(0).sample(range(800), 100)`` (indices into that
sorted list); the other 700 train. This script writes them as ``bench_train.jsonl`` and
``bench_val.jsonl`` beside ``captions.jsonl``; training reads only ``bench_train.jsonl`` (its own
seeded 10% of it for monitoring), and the held-out 100 are scored once, from the final weights, by
:func:`vitkit.evaluate_caption.retrieve` (``vitkit retrieve RUN --data bench_val.jsonl``): all 500
captions against all 100 images, recall@1/5/10 both ways, against chance (text->image R@k = k/100).
The run's ``best/`` checkpoint (chosen by the run itself on its monitoring split: the mean recall
there) is scored the same way under ``"best"``: with 700 photos a from-scratch run passes over
them a hundred times and more. The caption plan ends such a run on that checkpoint
(``engine.end_on_best``; ``"ended_on_best"`` records the step and both monitoring scores), so the
final weights, the headline keys, are then the same weights.

Rows (each ``--budget``, 20 min by default):

- ``scratch``: ``clip_nano`` (conv-stem nano ViT at 64 px + a small causal text tower);
- ``init:<name>``: the backbone of ``--init`` (a vitkit run or weights file, e.g. the self-supervised
  CIFAR-10 runs of ``benchmarks/ssl_cifar10.py``) with ``model.head=clip`` around it and its
  weights in the image tower (``model.init``); give the backbone's constructor arguments as
  ``model.args.K=V`` overrides when it was built with non-default ones;
- ``lit:<name>``: the same tower locked (``objective.lock_image=true``, LiT): only the text tower, the
  image projection and the temperature learn.

Both use a BPE trained on the training captions (``model.head_args.tokenizer=trained``) unless
``--tokenizer model``. Rows are merged into ``benchmarks/results/clip.json`` under ``"flickr"``,
with a retrieval figure ``clip_flickr_retrieval.png`` (held-out captions and their top-5 images)
from the best row.

    python benchmarks/clip_flickr.py                                     # scratch, 20 min
    python benchmarks/clip_flickr.py --init runs/ssl-dino/model.safetensors --rows init
    python benchmarks/clip_flickr.py --init runs/cifar10 --rows lit    # the tower locked
    python benchmarks/clip_flickr.py --budget 30s --smoke               # a one-minute smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tarfile
import tempfile
from pathlib import Path

from clip_shapes import merge_results, step_seconds

from _common import RESULTS, cli_train, machine, versions

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
ARCHIVE = SHARED / "flickr800.tar.gz"
CACHE = Path(os.environ.get("VITKIT_BENCH_CACHE", Path.home() / ".cache" / "vitkit-bench"))
N_IMAGES, N_VAL, SPLIT_SEED = 800, 100, 0
FIGURE = "clip_flickr_retrieval.png"


def flickr_root(path: str | None) -> Path:
    """The extracted ``flickr800/`` folder (extracted once into the cache from the shared archive)."""
    if path:
        return Path(path)
    root = CACHE / "flickr800" / "flickr800"
    if not (root / "captions.jsonl").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(root.parent, filter="data")
    return root


def held_out_split(root: Path) -> tuple[Path, Path, list[dict]]:
    """Write ``bench_train.jsonl`` / ``bench_val.jsonl`` by the held-out rule; returns them and the val rows."""
    rows = [json.loads(ln) for ln in (root / "captions.jsonl").read_text().splitlines() if ln.strip()]
    rows.sort(key=lambda r: r["image"])
    if len(rows) != N_IMAGES:
        raise SystemExit(f"{root}/captions.jsonl has {len(rows)} images, expected {N_IMAGES}")
    val_idx = set(random.Random(SPLIT_SEED).sample(range(N_IMAGES), N_VAL))
    val = [r for i, r in enumerate(rows) if i in val_idx]
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    paths = root / "bench_train.jsonl", root / "bench_val.jsonl"
    for path, part in zip(paths, (train, val)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths[0], paths[1], val


def init_args(init: str) -> list[str]:
    """``model.name`` / ``model.head`` / ``model.init`` for a vitkit image tower run or weights file."""
    from vitkit.rundir import RunDir
    from vitkit.weights_io import read_metadata

    p = Path(init)
    weights = RunDir(p).weights() if p.is_dir() else p
    meta = read_metadata(weights)
    name = meta.get("model_name")
    if not name:
        raise SystemExit(f"{init}: no architecture in its metadata; pass a vitkit run or a save_weights file")
    # The tower's shape (e.g. a wider conv stem) comes with the weights; its input size, classes and
    # regularisation are the caption run's own.
    skip = {"img_size", "num_classes", "in_chans", "drop_path_rate", "global_pool"}
    arch = {k: v for k, v in json.loads(meta.get("model_args") or "{}").items() if k not in skip}
    return [f"model.name={name}", "model.head=clip", f"model.init={weights}",
            *(f"model.args.{k}={json.dumps(v)}" for k, v in sorted(arch.items()))]


def figure(run: Path, val_jsonl: Path, rows: list[dict], out: Path, n_queries: int = 4, k: int = 5) -> None:
    """Held-out captions (one per row of the figure) and their top-k images; the true image framed green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image

    from vitkit.source import load_clip_model

    lm = load_clip_model(str(run), device="cpu")
    images = [Image.open(val_jsonl.parent / r["image"]).convert("RGB") for r in rows]
    with torch.no_grad():
        emb = torch.cat([lm.image_embeds(torch.stack([lm.transform(im) for im in images[i:i + 50]]))
                         for i in range(0, len(images), 50)])
    picks = random.Random(1).sample(range(len(rows)), n_queries)
    queries = [rows[i]["captions"][0] for i in picks]
    sims = lm.text_embeds(queries) @ emb.T
    fig, axes = plt.subplots(n_queries, k, figsize=(2.2 * k, 2.2 * n_queries), gridspec_kw={"hspace": 0.5})
    for q, i in enumerate(picks):
        top = sims[q].topk(k).indices.tolist()
        for c, j in enumerate(top):
            ax = axes[q][c]
            ax.imshow(images[j])
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("limegreen" if j == i else "lightgray")
                side.set_linewidth(4 if j == i else 1)
    titles = []
    for q, (i, text) in enumerate(zip(picks, queries)):
        rank = int((sims[q] > sims[q][i]).sum()) + 1
        titles.append(f"\"{text[:90]}\"  (its photo ranks {rank} of {len(rows)})")
    fig.suptitle("text -> image, top 5 of the 100 held-out Flickr800 photos (green frame: the captioned photo)",
                 fontsize=9)
    for q, title in enumerate(titles):  # above each row, over the whole row (a title would sit under images)
        box = axes[q][0].get_position()
        fig.text(box.x0, box.y1 + 0.01, title, fontsize=8, ha="left", va="bottom",
                 bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="an extracted flickr800/ folder (default: the shared archive, extracted to the cache)")
    p.add_argument("--budget", default="20m", help="training time per row (engine.time_budget)")
    p.add_argument("--rows", default="scratch,init", help="scratch, init and/or lit (init and lit need --init)")
    p.add_argument("--init", help="a vitkit run or weights file whose backbone becomes the image tower")
    p.add_argument("--tokenizer", default="trained", choices=("trained", "model"))
    p.add_argument("--out", help="where the runs go (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="do not write results/clip.json or the figure")
    p.add_argument("overrides", nargs="*", help="extra key=value for vitkit train")
    args = p.parse_args()
    import vitkit
    from vitkit.evaluate_caption import retrieve

    root = flickr_root(args.data)
    train_jsonl, val_jsonl, val_rows = held_out_split(root)
    out_root = Path(args.out or tempfile.mkdtemp(prefix="clip_flickr_"))
    common = [f"engine.time_budget={args.budget}", f"model.head_args.tokenizer={args.tokenizer}", *args.overrides]
    todo = {}
    for row in args.rows.split(","):
        if row == "scratch":
            todo["scratch"] = ["model.name=clip_nano"]
        elif row in ("init", "lit") and args.init:
            lock = ["objective.lock_image=true"] if row == "lit" else []
            todo[f"{row}:{Path(args.init).stem if Path(args.init).is_file() else Path(args.init).name}"] = \
                [*init_args(args.init), *lock]
        elif row in ("init", "lit"):
            print(f"skipping the {row} row: no --init given")
        else:
            raise SystemExit(f"--rows: unknown row {row!r}; choose from scratch, init, lit")
    results, runs = {}, {}
    for name, model_args in todo.items():
        run = out_root / name.replace(":", "_")
        trained = cli_train(str(train_jsonl), run, [*model_args, *common])
        rt = retrieve(str(run), str(val_jsonl), ks=(1, 5, 10))
        results[name] = {
            **{f"{d}_r{k}": rt[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)},
            "chance": rt["chance"], "r5_over_chance": rt["t2i_r5"] / rt["chance"]["t2i_r5"],
            "wall_s": trained["wall_s"], "steps": trained["summary"].get("steps"),
            "step_s": step_seconds(trained["summary"]), "n_val_images": rt["n_images"], "n_val_texts": rt["n_texts"],
            "budget": args.budget, "command": trained["command"], "init": args.init if name != "scratch" else None,
            "ended_on_best": trained["summary"].get("ended_on_best"),  # the plan's engine.end_on_best, if it acted
        }
        best_ckpt = run / "checkpoints" / "best"
        if best_ckpt.is_dir():
            rb = retrieve(str(best_ckpt), str(val_jsonl), ks=(1, 5, 10))
            source = best_ckpt / "source"  # the step_N folder best/ copies
            step = int(source.read_text().strip().removeprefix("step_")) if source.is_file() else None
            results[name]["best"] = {
                **{f"{d}_r{k}": rb[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)},
                "r5_over_chance": rb["t2i_r5"] / rb["chance"]["t2i_r5"], "step": step,
                "chosen_by": "the run's mean recall on its own monitoring split (a seeded tenth of the training images)",
            }
            print(f"{name} best/ (step {step}): t2i R@5 {rb['t2i_r5']:.1%}, i2t R@5 {rb['i2t_r5']:.1%}")
        runs[name] = run
        print(f"{name}: t2i R@1/5/10 {rt['t2i_r1']:.1%}/{rt['t2i_r5']:.1%}/{rt['t2i_r10']:.1%}, i2t "
              f"{rt['i2t_r1']:.1%}/{rt['i2t_r5']:.1%}/{rt['i2t_r10']:.1%} (chance t2i R@5 {rt['chance']['t2i_r5']:.0%}),"
              f" {trained['wall_s']:.0f} s")
    if not results:
        raise SystemExit("nothing to run")
    if args.smoke:
        print(json.dumps(results, indent=2)[:2000])
        return
    best = max(results, key=lambda n: results[n]["t2i_r5"])
    figure(runs[best], val_jsonl, val_rows, RESULTS / FIGURE)
    extra = {"machine": machine(), "versions": versions(vitkit), "held_out": f"sorted names, random.Random("
             f"{SPLIT_SEED}).sample(range({N_IMAGES}), {N_VAL})", "budget": args.budget, "figure": FIGURE,
             "figure_run": best}
    print(f"wrote {merge_results('flickr', results, extra)} and {RESULTS / FIGURE}")


if __name__ == "__main__":
    main()
