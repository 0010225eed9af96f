"""Does seeing the image help a caption LM? Flickr800 caption perplexity, image-blind vs a LLaVA-style connector.

Data: ``flickr800.tar.gz`` (``captions.jsonl``: ``{"image": "images/NAME.jpg", "captions": [...]}``).
Held-out split, the same as ``benchmarks/clip_flickr.py``: sort the image names, then
``val = [names[i] for i in random.Random(0).sample(range(len(names)), 100)]`` (the seeded 100);
everything else trains. Nothing is tuned on the held-out images.

A dev split, a seeded tenth of the training images (``--dev``), picks every checkpoint: each
training stage evaluates the dev perplexity every ``--eval-every`` steps and ends on its best
state, so no arm is scored after it has overfitted its 3,500 captions (the image-blind LM
passes its best within minutes here) and the held-out images choose nothing.

Recipe (both arms get the same wall-clock budget after a shared start):
1. a caption tokenizer trained on the training captions (``vitkit.text.train_caption_tokenizer``)
   and a small causal LM (a Hugging Face Llama config, rotary positions, from scratch) trained
   image-blind on the training captions for ``--lm-budget``, ending on its best dev state;
2. from that LM, for ``--budget`` each, each ending on its best dev state:
   ``blind``: the LM keeps training on the captions alone;
   ``connector``: LLaVA's stage 1, ``vitkit.vlm.VisionLanguageModel`` with the frozen image tower
   (``--clip``: a CLIP run dir or weights file, or any source ``vitkit.source.load_model`` takes;
   features from its second-to-last block, class token dropped) and the LM frozen, only the
   2-layer MLP projector trains;
   ``connector_tuned`` (skip with ``--no-tuned``): the projector and the LM train together (LLaVA's
   stage 2 on captions). ``ppl_connector`` is the frozen-LM arm, the connector the issue asks about.
The image features are computed once (eval transform, frozen tower), so the arms' budgets buy
the same kind of steps. Perplexity: every caption of the 100 held-out images, per token, the
start token given (``vitkit.vlm.caption_perplexity``).

    python benchmarks/vlm_connector.py --clip runs/clip_flickr_best            # the real run
    python benchmarks/vlm_connector.py --clip clip_nano --smoke               # a 1-minute smoke

Writes ``benchmarks/results/clip.json``'s ``vlm`` section (merged; ``ppl_blind``,
``ppl_connector``) and the details in ``benchmarks/results/vlm_connector.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tarfile
import time
from pathlib import Path

import torch

from vitkit._peers import import_peer

from _common import RESULTS, machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
ARCHIVE = SHARED / "flickr800.tar.gz"
CACHE = Path(os.environ.get("VITKIT_BENCH_CACHE", Path.home() / ".cache" / "vitkit-bench"))
N_VAL = 100


def flickr_root(path: str | None) -> Path:
    """The extracted folder holding ``captions.jsonl`` (extracted once into the cache)."""
    if path and Path(path).is_dir():
        return Path(path)
    archive = Path(path) if path else ARCHIVE
    root = CACHE / "flickr800" / "flickr800"
    if not (root / "captions.jsonl").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tf:
            tf.extractall(root.parent, filter="data")
    return root


def split(root: Path) -> tuple[list[dict], list[dict]]:
    """(train, val) records; val is the seeded 100 of the sorted image names (as clip_flickr.py)."""
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["image"])
    val_idx = set(random.Random(0).sample(range(len(rows)), min(N_VAL, len(rows))))
    return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]


def load_encoder(source: str, pretrained: bool):
    """(model, eval transform, normalisation) of the frozen image tower.

    A two-tower name (``clip_nano``, random weights), a CLIP weights file or run dir
    (``vitkit.clip.load_clip``), else anything ``vitkit.source.load_model`` takes (a vitkit backbone).
    """
    from vitkit.clip import create_clip, list_clip_models, load_clip
    from vitkit.data.augment import Normalize
    from vitkit.data.transforms import EvalTransform
    from vitkit.errors import VitkitError
    from vitkit.source import load_model

    model = None
    if source in list_clip_models():
        model = create_clip(source).eval()
    elif Path(source).exists():
        try:
            model = load_clip(source)
        except VitkitError as e:
            print(f"{source} is not a two-tower model ({e}); reading it as an image backbone")
    if model is None:
        loaded = load_model(source, device="cpu", pretrained=pretrained)
        return loaded.model.eval(), loaded.transform, loaded.normalize
    card = model.card
    return model, EvalTransform(tuple(card.input_size[1:]), card.input_size[0], crop_pct=card.crop_pct), \
        Normalize(card.mean, card.std)


@torch.no_grad()
def encode_all(encoder, root: Path, rows: list[dict], layer: int, batch: int = 32) -> torch.Tensor:
    """(N, K, C) frozen-tower features of every image (eval transform, its normalisation)."""
    from vitkit.data.images import read_image
    from vitkit.vlm import image_features

    model, transform, normalize = encoder
    out = []
    for i in range(0, len(rows), batch):
        imgs = torch.stack([transform(read_image(root / r["image"], transform.in_chans)) for r in rows[i:i + batch]])
        out.append(image_features(model, normalize(imgs), layer).float().cpu())
    return torch.cat(out)


def build_lm(vocab_size: int, width: int, depth: int, max_len: int):
    transformers = import_peer("transformers")
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                                   num_hidden_layers=depth, num_attention_heads=max(1, width // 32),
                                   num_key_value_heads=max(1, width // 32), max_position_embeddings=max_len,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg), cfg.to_dict()


def train(model, feats, rows, *, use_images: bool, params, lr: float, budget: float, batch: int, seed: int,
          dev: tuple, eval_every: int) -> dict:
    """Train ``params`` for ``budget`` seconds on (image, one random caption) pairs, evaluating the dev
    perplexity every ``eval_every`` steps; ends with ``params`` at their best dev state (the start's if
    nothing beat it). Returns steps, timing and the dev curve."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    dev_feats, dev_rows = dev

    def dev_ppl() -> float:
        return perplexity(model, dev_feats, dev_rows, use_images=use_images)

    best = (dev_ppl(), 0, [p.detach().clone() for p in params])
    curve = [(0, round(best[0], 3))]
    model.train()
    steps, t0, losses, train_s = 0, time.perf_counter(), [], 0.0
    while train_s < budget:
        t = time.perf_counter()
        idx = rng.sample(range(len(rows)), batch)
        text = model.tokenize([rng.choice(rows[i]["captions"]) for i in idx])
        out = model(None, **text, features=feats[idx] if use_images else None)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps += 1
        losses.append(out["loss"].item())
        train_s += time.perf_counter() - t
        if steps % eval_every == 0:
            ppl = dev_ppl()  # caption_perplexity puts the model back in train mode
            curve.append((steps, round(ppl, 3)))
            if ppl < best[0]:
                best = (ppl, steps, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, b in zip(params, best[2]):
            p.copy_(b)
    wall = time.perf_counter() - t0
    return {"steps": steps, "wall_s": round(wall, 1), "train_s": round(train_s, 1),
            "step_s": round(train_s / max(steps, 1), 4), "best_step": best[1], "dev_ppl": round(best[0], 3),
            "dev_curve": curve, "final_train_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}


def perplexity(model, feats, rows, *, use_images: bool) -> float:
    from vitkit.vlm import caption_perplexity

    loader = [{"features": feats[i:i + 16], "captions": [r["captions"] for r in rows[i:i + 16]]}
              for i in range(0, len(rows), 16)]
    return caption_perplexity(model, loader, use_images=use_images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", required=True, help="the frozen image tower: a CLIP run dir / weights file, or any "
                                                  "vitkit.source.load_model source")
    ap.add_argument("--data", default=None, help="flickr800 folder or archive (default: the shared archive)")
    ap.add_argument("--lm-budget", type=float, default=600.0, help="seconds of image-blind LM pretraining")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds per arm after the shared start")
    ap.add_argument("--tuned", action=argparse.BooleanOptionalAction, default=True,
                    help="also the arm training projector and LM together")
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="the LM's learning rate")
    ap.add_argument("--projector-lr", type=float, default=1e-3)
    ap.add_argument("--layer", type=int, default=-2)
    ap.add_argument("--dev", type=int, default=70, help="training images held out as the dev split (seeded)")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between dev evaluations")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny budgets and sizes; results go to /tmp only")
    args = ap.parse_args()
    if args.smoke:
        args.lm_budget, args.budget, args.width, args.depth, args.vocab, args.eval_every = 12.0, 8.0, 64, 2, 512, 5
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from vitkit.text import train_caption_tokenizer
    from vitkit.vlm import VisionLanguageModel

    root = flickr_root(args.data)
    train_rows, val_rows = split(root)
    dev_idx = set(random.Random(1).sample(range(len(train_rows)), min(args.dev, len(train_rows) - 1)))
    dev_rows = [r for i, r in enumerate(train_rows) if i in dev_idx]
    train_rows = [r for i, r in enumerate(train_rows) if i not in dev_idx]
    t0 = time.perf_counter()
    encoder = load_encoder(args.clip, pretrained=not args.smoke)
    feats_train = encode_all(encoder, root, train_rows, args.layer)
    feats_val = encode_all(encoder, root, val_rows, args.layer)
    dev = (encode_all(encoder, root, dev_rows, args.layer), dev_rows)
    encode_s = time.perf_counter() - t0
    tok = train_caption_tokenizer([c for r in train_rows for c in r["captions"]], vocab_size=args.vocab,
                                  context_length=args.context)
    lm, lm_cfg = build_lm(tok.vocab_size, args.width, args.depth, args.context + feats_train.shape[1] + 8)

    def vlm(lm_module, *, freeze_lm: bool):
        torch.manual_seed(1)
        return VisionLanguageModel(encoder[0], lm_module, layer=args.layer, freeze_lm=freeze_lm, tokenizer=tok,
                                   context_length=args.context)

    base = vlm(lm, freeze_lm=False)
    runs = {"lm_pretrain": train(base, feats_train, train_rows, use_images=False, params=list(lm.parameters()),
                                 lr=args.lr, budget=args.lm_budget, batch=args.batch, seed=0, dev=dev,
                                 eval_every=args.eval_every)}
    start = {k: v.clone() for k, v in lm.state_dict().items()}
    ppl = {"start": perplexity(base, feats_val, val_rows, use_images=False)}

    arms = ["blind", "connector"] + (["connector_tuned"] if args.tuned else [])
    for arm in arms:
        lm.load_state_dict(start)
        lm.requires_grad_(True)  # the frozen arm switched it off
        model = vlm(lm, freeze_lm=arm == "connector")
        use_images = arm != "blind"
        params = ([] if arm == "connector" else list(lm.parameters())) + (
            list(model.projector.parameters()) if use_images else [])
        lr = args.projector_lr if arm == "connector" else args.lr
        runs[arm] = train(model, feats_train, train_rows, use_images=use_images, params=params, lr=lr,
                          budget=args.budget, batch=args.batch, seed=1, dev=dev, eval_every=args.eval_every)
        ppl[arm] = perplexity(model, feats_val, val_rows, use_images=use_images)
        print(f"{arm:16s} ppl {ppl[arm]:.2f}  (best dev at step {runs[arm]['best_step']} of {runs[arm]['steps']}, "
              f"{runs[arm]['step_s']} s/step)", flush=True)

    vlm_row = {"ppl_blind": round(ppl["blind"], 3), "ppl_connector": round(ppl["connector"], 3),
               "reduction": round(1 - ppl["connector"] / ppl["blind"], 4), "ppl_start": round(ppl["start"], 3)}
    if args.tuned:
        vlm_row["ppl_connector_tuned"] = round(ppl["connector_tuned"], 3)
    print(json.dumps(vlm_row))
    detail = {
        "vlm": vlm_row, "runs": runs, "encoder": args.clip, "layer": args.layer, "image_tokens": feats_train.shape[1],
        "feature_dim": feats_train.shape[2], "encode_s": round(encode_s, 1), "lm_config": lm_cfg,
        "tokenizer_vocab": tok.vocab_size, "args": vars(args), "n_train": len(train_rows), "n_dev": len(dev_rows),
        "n_val": len(val_rows),
        "protocol": "every stage ends on its best dev-perplexity state (dev: a seeded tenth of the training images); "
                    "ppl on every caption of the 100 held-out images",
        "val_captions": sum(len(r["captions"]) for r in val_rows), "machine": machine(),
        "versions": versions(import_peer("transformers")),
    }
    if args.smoke:
        print(f"smoke results: {write_smoke(detail)}")
        return
    write_json("vlm_connector.json", detail)
    clip_json = RESULTS / "clip.json"
    merged = json.loads(clip_json.read_text()) if clip_json.is_file() else {}
    merged["vlm"] = {**vlm_row, "budget_s": args.budget, "lm_budget_s": args.lm_budget, "encoder": args.clip}
    write_json("clip.json", merged)


def write_smoke(detail: dict) -> Path:
    path = Path("/tmp") / "vlm_connector_smoke.json"
    path.write_text(json.dumps(detail, indent=2, default=str) + "\n")
    return path


if __name__ == "__main__":
    main()
