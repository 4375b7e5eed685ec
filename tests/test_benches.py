"""The benchmarks' command lines: asked for a GPU that is not there, they stop at once with the reason, instead of
running the GPU shapes on the CPU (where a 7B -> 3B case is killed for memory minutes later)."""

from __future__ import annotations

import pytest
import torch

from tests.runs import tool_main


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
@pytest.mark.parametrize("tool", ["bench_kd_loss", "bench_distill_step"])
def test_device_cuda_without_a_gpu_is_refused(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool_main(tool)(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: torch sees no CUDA GPU here; use --device cpu" in capsys.readouterr().err
