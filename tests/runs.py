"""What the multi-process tests share: the tiny models, a run's overrides, and starting minima.distill under a real
launcher (torchrun, deepspeed or a plain process) with one thread per rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEQ = 64
STUDENT_ARCH = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,"
    " num_key_value_heads: 2, max_position_embeddings: 64}"
)
# STUDENT_ARCH's shape as minima's MoE students are built (minima.moe): 4 FFN experts of its width, top-1.
MOE_STUDENT_ARCH = (
    "{model_type: qwen2_moe, hidden_size: 32, intermediate_size: 64, moe_intermediate_size: 64, num_experts: 4,"
    " num_experts_per_tok: 1, norm_topk_prob: false, shared_expert_intermediate_size: 1, qkv_bias: false,"
    " num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}"
)
# The teacher's head is padded past the tokenizer (1024 ids) as in real model families; KD compares the first 1024.
TEACHER_ARCH = (
    "{model_type: llama, hidden_size: 48, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 4,"
    " num_key_value_heads: 4, max_position_embeddings: 64, vocab_size: 1088}"
)


def subprocess_env(gpu: bool = False) -> dict[str, str]:
    """One thread per rank (2 ranks on 2 cores), and this virtualenv's tools first on PATH; unless ``gpu``, the CPU
    accelerator with any GPU hidden, so that the CPU tests run the same on a GPU machine.

    PATH matters: DeepSpeed JIT-builds a C++ op with whichever `ninja` PATH finds first, and two ninja versions
    hash the same build command differently, so alternating between them rebuilds the op (~30 s) every time.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if not gpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def distill_cmd(args: list[str], *, launcher: str = "torchrun", nproc: int = 2, launcher_args=()) -> list[str]:
    """The command line of minima.distill on the tiny recipe under a launcher (torchrun, deepspeed or python)."""
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *launcher_args]
        cmd += ["-m", "minima.distill"]
    elif launcher == "deepspeed":
        from minima.dist import free_port

        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *launcher_args]
        cmd += ["--module", "minima.distill"]
    else:
        cmd = [sys.executable, "-m", "minima.distill"]
    return [*cmd, "tiny_cpu", *args]


def launch(
    args: list[str],
    *,
    launcher: str = "torchrun",
    nproc: int = 2,
    timeout: int = 300,
    background: bool = False,
    launcher_args=(),
    gpu: bool = False,
):
    """Start minima.distill under a real launcher (torchrun, deepspeed, or a plain python process), on the CPU unless
    ``gpu``; in the background, in a session of its own (so that a test can signal the whole process group, as SLURM
    does)."""
    env = subprocess_env(gpu)
    cmd = distill_cmd(args, launcher=launcher, nproc=nproc, launcher_args=launcher_args)
    if background:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def tool_main(name: str):
    """``main(argv)`` of ``tools/<name>.py``, imported in this process (a tool's second and later invocations in a
    test need not pay for a new interpreter and its imports)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"minima_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
