"""The run summary (summary.json): final and best validation metrics, counts, throughput, settings."""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum


def build_summary(tr, reason: str, wall_s: float) -> dict:
    """Summary of trainer ``tr`` after ``fit``; collective (the skip counts are summed over processes).

    ``tr.summary_extra``, when set, is called last and its fields are added (and win): whoever
    drives the trainer (``vitkit.train``) adds what the engine does not know, so that
    ``summary.json`` has one writer.
    """
    st = tr.state
    counts = all_reduce_sum(torch.tensor([st.skipped_files], dtype=torch.float64))
    val = {k: v for k, v in tr.last_val.items() if not k.startswith("_")}
    summary = {
        "objective": tr.objective_name,
        "val_acc": val.get("acc1"),
        "val_balanced_acc": val.get("balanced_acc"),
        "best_val_acc": st.best_val_acc,
        "best_metric": st.best_metric_name,
        "best_metric_value": st.best_metric,
        "val_loss": val.get("loss"),
        "epochs": st.epoch + st.epoch_step / tr.steps_per_epoch,
        "steps": st.step,
        "total_steps": tr.total_steps,
        "stopped": reason,
        "wall_s": wall_s,
        "train_time_s": st.train_time_s,
        "train_img_per_s": st.train_samples / st.train_time_s if st.train_time_s > 0 else 0.0,
        "skipped_files": int(counts[0]),
        "nonfinite_skipped": int(st.nonfinite_skipped),
        "world_size": tr.dist.world_size,
        "amp": str(tr.amp_dtype).replace("torch.", "") if tr.amp_dtype else "none",
        "global_batch": tr.global_batch,
        "base_lr": tr.base_lr,
    }
    if tr.ema is not None:
        summary["val_acc_ema"] = val.get("ema_acc1")
    if getattr(tr, "ended_on_best", None):  # engine.end_on_best kept an earlier step's weights
        summary["ended_on_best"] = dict(tr.ended_on_best)
    summary.update({f"val_{k}": v for k, v in val.items() if f"val_{k}" not in summary and k != "acc1"})
    extra = tr.summary_extra
    if extra is not None:
        summary.update(extra())
    return summary
