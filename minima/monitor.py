"""What a run shows while it trains: TensorBoard scalars, a plain log file and a tqdm bar, all on rank 0.

Needs no environment variable. Other ranks log warnings and errors only.
"""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

# Dense bf16 tensor-core peaks (FLOP/s per GPU) from vendor datasheets, for model FLOPs utilisation.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of this GPU, or None (CPU, or a GPU not in the table: MFU is then not logged)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # most specific names first
        if key in name:
            return flops
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA max-allocated on GPU, the process's max resident set on CPU (GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def device_memory_bytes(device: torch.device, ranks_on_node: int) -> int:
    """What one rank may plan to use: the GPU's memory, or on CPU the host's available memory shared by its ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return fields.get("MemAvailable", fields["MemTotal"]) // max(1, ranks_on_node)


def setup_logging(out_dir: Path | None, is_main: bool) -> logging.Logger:
    """'minima' logger: rank 0 writes INFO to stderr and to <out_dir>/train.log; other ranks WARNING to stderr."""
    logger = logging.getLogger("minima")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_TqdmHandler()]
    if is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


class _TqdmHandler(logging.Handler):
    """Writes log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


class Monitor:
    """TensorBoard scalars + log lines + progress bar; a no-op on ranks other than 0."""

    def __init__(self, out_dir: Path, *, is_main: bool, total_steps: int, start_step: int) -> None:
        self.is_main = is_main
        self.logger = logging.getLogger("minima")
        self.tensorboard_dir = out_dir / "tensorboard"
        self.writer = None
        self.bar = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard_dir))
            # disable=None: a bar on terminals; in batch logs (SLURM, CI) the log lines carry progress instead
            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr, disable=None
            )

    def scalars(self, step: int, values: dict[str, float], *, show: tuple[str, ...] = ()) -> None:
        """Write ``values`` (names like 'train/loss') at ``step``; log a line with all of them."""
        if not self.is_main:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.logger.info(f"step {step} " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        if show:
            self.bar.set_postfix({k.split("/")[-1]: _fmt(values[k]) for k in show if k in values}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
