"""Time and peak memory of a KD loss's forward + backward: naive full logits vs minima's chunked path (vs Liger).

    python tools/bench_kd_loss.py --tokens 4096 --student-hidden 1024 --teacher-hidden 2048 --vocab 49216 \\
        --dtype fp32 --device cpu
    python tools/bench_kd_loss.py --tokens 8192 --student-hidden 2048 --teacher-hidden 4096 --vocab 128256 \\
        --dtype bf16 --device cuda --json bench.json

Cases (same inputs, same loss: 0.5 CE + 0.5 T^2 * divergence, summed over tokens):
  naive    both models' full (tokens, vocab) logits, F.log_softmax, the divergence, autograd backward
  chunked  minima.losses.kd_loss_from_hidden (chunks of tokens; gradients computed chunk by chunk)
  chunked_compiled  the same with each chunk's elementwise work fused by torch.compile (kd.compile; the default
           in training on GPUs); compiled during the warm-up runs
  liger    Liger-Kernel's chunked distillation loss (LigerFusedLinearJSDLoss), when liger-kernel is installed;
           generalized JSD only, so it runs when --divergence is jsd or forward_kl (beta 0)

Each case runs in a fresh subprocess. Peak memory is the extra memory of one forward + backward on top of the
inputs (hidden states, heads, labels):
  cuda  torch.cuda.max_memory_allocated() after the run minus memory_allocated() before it;
  cpu   the process's peak resident set (VmHWM in /proc/self/status) minus its resident set once the inputs exist;
        torch's CPU allocator returns large blocks to the OS, so this follows torch's own allocations.
Time is the median of --repeats runs after --warmup runs (CUDA-synchronised on GPUs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("naive", "chunked", "chunked_compiled", "liger")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(args: argparse.Namespace) -> dict:
    """One case in this process: build inputs, measure one run's peak extra memory, then time repeated runs."""
    import torch
    import torch.nn.functional as F

    from minima.divergences import token_divergence
    from minima.losses import kd_loss_from_hidden

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    n, hs, ht, v = args.tokens, args.student_hidden, args.teacher_hidden, args.vocab
    s_hidden = (torch.randn(n, hs, device=device) / hs**0.5).to(dtype).requires_grad_(True)
    s_head = (torch.randn(v, hs, device=device)).to(dtype).requires_grad_(True)
    t_hidden = (torch.randn(n, ht, device=device) / ht**0.5).to(dtype)
    t_head = torch.randn(v, ht, device=device).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    T = args.temperature

    def naive():
        s_logits = (s_hidden @ s_head.t()).float()  # (N, V)
        with torch.no_grad():
            t_logits = (t_hidden @ t_head.t()).float()  # (N, V)
        ce = F.cross_entropy(s_logits, labels, reduction="sum")
        kd = token_divergence(s_logits, t_logits, divergence=args.divergence, temperature=T, beta=args.beta).sum()
        (0.5 * ce + 0.5 * kd).backward()

    def chunked(compiled=False):
        out = kd_loss_from_hidden(
            s_hidden,
            s_head,
            labels,
            t_hidden,
            t_head,
            divergence=args.divergence,
            temperature=T,
            beta=args.beta,
            chunk_tokens=args.chunk_tokens,
            compiled=compiled,
        )
        out.loss_sum.backward()

    if args.case == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        beta = 0.0 if args.divergence == "forward_kl" else args.beta
        liger_loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=beta, temperature=T)

        def liger():
            liger_loss(s_hidden, s_head, t_hidden, t_head, labels).backward()

    cases = {"naive": naive, "chunked": chunked, "chunked_compiled": lambda: chunked(compiled=True)}
    fn = cases[args.case] if args.case != "liger" else locals()["liger"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def clear_grads():
        s_hidden.grad = None
        s_head.grad = None

    if args.case in ("chunked_compiled", "liger"):  # compile before measuring: memory of a run, not of compiling
        fn()
    # Memory: one run, on top of the inputs.
    clear_grads()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_kib("VmRSS")
        fn()
        peak_extra = (_rss_kib("VmHWM") - base) * 1024
    times = []
    for i in range(args.warmup + args.repeats):
        clear_grads()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {
        "case": args.case,
        "median_ms": 1000 * statistics.median(times),
        "times_ms": [1000 * t for t in times],
        "peak_extra_gb": peak_extra / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--student-hidden", type=int, default=1024)
    parser.add_argument("--teacher-hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49216)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.5, help="JSD beta")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="minima's chunk (default: automatic)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="naive,chunked,chunked_compiled,liger")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case here
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return 0

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA GPU here; use --device cpu, or run on a GPU machine")
    cases = [c for c in args.cases.split(",") if c]
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        if "liger" in cases:
            print("liger-kernel is not installed: skipping the liger case", file=sys.stderr)
            cases.remove("liger")
    if "liger" in cases and args.divergence not in ("jsd", "forward_kl"):
        print(f"Liger has no {args.divergence}: skipping the liger case", file=sys.stderr)
        cases.remove("liger")
    results = []
    for case in cases:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--case", case]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{case} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            results.append({"case": case, "error": proc.stderr.strip().splitlines()[-1]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {case}: {results[-1]['median_ms']:.1f} ms, {results[-1]['peak_extra_gb']:.3f} GB", file=sys.stderr)

    shape = {k: getattr(args, k) for k in ("tokens", "student_hidden", "teacher_hidden", "vocab", "dtype", "device")}
    shape["divergence"] = args.divergence
    print(f"\nKD loss forward+backward, {json.dumps(shape)}\n")
    print(f"{'case':<18}{'median ms':>12}{'peak extra GB':>16}{'time / naive':>14}{'memory / naive':>16}")
    naive = next((r for r in results if r["case"] == "naive" and "error" not in r), None)
    for r in results:
        if "error" in r:
            print(f"{r['case']:<18}  failed: {r['error']}")
            continue
        t_ratio = f"{r['median_ms'] / naive['median_ms']:.2f}x" if naive else "-"
        m_ratio = f"{r['peak_extra_gb'] / naive['peak_extra_gb']:.1%}" if naive else "-"
        print(f"{r['case']:<18}{r['median_ms']:>12.1f}{r['peak_extra_gb']:>16.3f}{t_ratio:>14}{m_ratio:>16}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "results": results}, indent=2))
    return 1 if all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
