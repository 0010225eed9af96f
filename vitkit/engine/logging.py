"""Run logs: metrics.jsonl, TensorBoard events, the progress display, and summary.json writing."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from ..rundir import RunDir
from .checkpoint import atomic_write_text


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` file (missing file -> [])."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Writes one JSON record per log step and per evaluation to ``metrics.jsonl`` and TensorBoard.

    Only the main process creates a RunLogger with ``enabled=True``; the others get a silent one.
    Progress goes to a tqdm bar when stdout is a terminal, plain lines otherwise.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.metrics_path = RunDir(self.out_dir).metrics
        self._file = None
        self._tb = None
        self._bar = None
        self._tty = sys.stdout.isatty()
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(RunDir(self.out_dir).tensorboard))
            except ImportError:
                self.info("tensorboard is not installed: pip install tensorboard (continuing without it)")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (left by an interrupted run) before a resume appends."""
        if not self.enabled or not self.metrics_path.exists():
            return
        keep = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict) -> None:
        """Append ``record`` (must hold ``step``) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        if self._file is None:
            self._file = open(self.metrics_path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "epoch", "kind") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def start_progress(self, total: int, initial: int) -> None:
        if self.enabled and self._tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def progress(self, step: int, total: int, record: dict, eta_s: float, approx: bool = False) -> None:
        """Show a step's metrics: updates the bar, or prints a line when not on a terminal.
        ``approx``: ``total`` is an estimate (the steps a time budget will reach)."""
        if not self.enabled:
            return
        shown = {k: record[k] for k in ("loss", "lr", "img_per_s") if k in record}
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
            return
        parts = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        self.info(f"step {step}/{'~' if approx else ''}{total} epoch {record.get('epoch', 0)} {parts} eta {_fmt_s(eta_s)}")

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(f"[vitkit {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    path = RunDir(out_dir).summary_json
    atomic_write_text(path, json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n")
    return path
