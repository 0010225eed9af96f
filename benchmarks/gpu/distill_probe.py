"""Training img/s of the cnn_vs_vit student on CIFAR-10, 500 steps: alone, with a (random) ResNet-18
teacher through DeiT hard distillation, and alone again (the run-to-run spread)."""

import json

from vitkit import save_weights
from vitkit.config import load_config
from vitkit.models import create_model
from vitkit.train import train

t = create_model("resnet18", num_classes=10, img_size=32)
save_weights(t, "/tmp/teacher/model.safetensors")
common = ["data.path=.gpu/cifar10-jpg.tar.gz", "engine.device=cuda", "data.num_workers=12", "engine.max_steps=500",
          "engine.time_budget=null", "engine.epochs=1000", "engine.eval_every=1000", "engine.tensorboard=false",
          "engine.plots=false", "model.name=vit_nano_convstem_patch4_32"]
distill = ["objective.name=deit", "objective.distill_type=hard", "objective.teacher=/tmp/teacher/model.safetensors"]
for name, extra in [("alone", []), ("distilled", distill), ("alone2", [])]:
    cfg = load_config("cifar10_fast", [*common, *extra, f"engine.out_dir=/tmp/dp/{name}"])
    cfg.model.args = {"conv_stem": False, "distilled": True, "global_pool": "token"}
    s = train(cfg, verbose=False, force=True)
    print(name, json.dumps({k: s[k] for k in ("steps", "train_img_per_s", "train_time_s", "wall_s")}), flush=True)
