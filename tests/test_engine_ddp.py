"""Multi-process training on CPU (gloo): DDP equals one process with the same global batch."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from helpers import ddp_worker, free_port, make_trainer

from vitkit.engine import find_latest, load_checkpoint


def test_ddp_two_processes_match_single_process(tmp_path):
    common = dict(epochs=2, drop=0.0, transform=None, optim={"clip_grad": 1.0})
    single = make_trainer(tmp_path / "single", batch_size=8, **common)
    single.fit()

    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(ddp_worker, args=(2, free_port(), str(out), {"batch_size": 4, **common}), nprocs=2, join=True)
    result = torch.load(out / "final.pt", weights_only=True)
    ref = single.objective.state_dict()
    for k, v in result["objective"].items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=0, msg=k)
    s = result["summary"]
    assert s["world_size"] == 2 and s["global_batch"] == 8 and s["steps"] == single.step
    # The val set is not sharded here, so each rank sees all of it: the all-reduced mean is unchanged.
    assert abs(s["val_loss"] - single.last_val["loss"]) < 1e-5
    assert find_latest(out).name == "step_000016"


def test_fsdp_two_processes_train_and_checkpoint_on_cpu(tmp_path):
    """FSDP2 (fully_shard) runs on gloo: same weights as one process, full-tensor checkpoint."""
    common = dict(epochs=1, drop=0.0, transform=None)
    single = make_trainer(tmp_path / "single", batch_size=8, **common)
    single.fit()

    out = tmp_path / "fsdp"
    out.mkdir()
    mp.spawn(ddp_worker, args=(2, free_port(), str(out), {"batch_size": 4, "fsdp": True, **common}), nprocs=2)
    ckpt = load_checkpoint(out)
    ref = single.objective.state_dict()
    for k, v in ckpt["objective"].items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=0, msg=k)
    assert set(ckpt["model"]) == set(single.objective.model.state_dict())
