"""``make demo``: a miniature MiniMA pipeline that needs no download, on CPUs or GPUs.

1. Train a sentencepiece tokenizer on the CPython standard library source found on this machine.
2. Write token shards and a held-out split with ``tools/prepare_data.py``'s code.
3. Train a small teacher from scratch (``teacher=null``).
4. Distil a smaller student from it (the ``tiny_cpu`` recipe: 0.5 CE + 0.5 KD at T=1).
5. Train the same student architecture for the same tokens without KD (the baseline).
6. Evaluate the three exported Hugging Face models on the held-out shards; print a table, write summary.json.

Steps 3-5 are real ``deepspeed`` launches of ``minima.distill`` (2 ranks under ZeRO-3 on CPU, or one per GPU); the
commands are printed so that they can be rerun by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from minima.dist import free_port
from minima.evaluate import evaluate_model
from minima.prepare import prepare_data
from minima.tokenizer import train_sentencepiece

# The demo's teacher: ~2.7x the student's non-embedding parameters, the ratio the law of capacity gap favours.
TEACHER_ARCH = (
    "{model_type: llama, hidden_size: 192, intermediate_size: 512, num_hidden_layers: 6, num_attention_heads: 6,"
    " num_key_value_heads: 6, max_position_embeddings: 256, tie_word_embeddings: false}"
)
TEACHER_TOKENS = 1_048_576
STUDENT_TOKENS = 524_288
VOCAB_SIZE = 2048  # small: at this width the output head is a large share of a tiny model's compute


def stdlib_files(max_bytes: int) -> list[Path]:
    """The standard library's .py files (no third-party site-packages), in sorted order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        files.append(path)
        total += size
        if total >= max_bytes:
            break
    if total < max_bytes // 4:
        raise SystemExit(f"found only {total} bytes of Python source under {root}; the demo needs a standard library")
    return files


def launch(out_dir: Path, overrides: list[str], num_ranks: int, log) -> dict:
    """Run ``minima.distill`` under the deepspeed launcher; return the run's metrics.json."""
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(num_ranks),
        "--master_port",
        str(free_port()),
        "--module",
        "minima.distill",
        "tiny_cpu",
        *overrides,
        f"run.out_dir={out_dir}",
    ]
    env = dict(os.environ)
    if not torch.cuda.is_available():  # one OpenMP thread per rank, or 2 ranks fight over the same cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // num_ranks)))
    log(f"$ {shlex.join(cmd)}")
    bin_dir = Path(sys.executable).parent  # the launcher of this virtualenv
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(cmd, check=True, env=env)
    return json.loads((out_dir / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minima.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="demo directory (recreated)")
    parser.add_argument("--corpus-mb", type=float, default=6.0, help="megabytes of stdlib source to use")
    parser.add_argument("--num-ranks", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--teacher-tokens", type=int, default=TEACHER_TOKENS)
    parser.add_argument("--student-tokens", type=int, default=STUDENT_TOKENS)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[demo {time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    files = stdlib_files(int(args.corpus_mb * 1e6))
    log(f"corpus: {len(files)} files of the standard library ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB)")
    tokenizer_dir = train_sentencepiece(files, out / "spm", vocab_size=args.vocab_size)
    log(f"tokenizer: {tokenizer_dir}")
    data_dir = out / "data"
    summary = prepare_data(files, tokenizer_dir, data_dir, valid_fraction=0.03, seed=0)
    log(f"data: {json.dumps(summary, default=str)}")

    data = [f"data.dir={data_dir}"]
    teacher = launch(
        out / "teacher",
        [*data, "teacher=null", f"student.arch={TEACHER_ARCH}", f"run.total_tokens={args.teacher_tokens}"],
        args.num_ranks,
        log,
    )
    teacher_dir = Path(teacher["export_dir"])
    kd = launch(
        out / "student_kd",
        [*data, f"teacher.path={teacher_dir}", f"run.total_tokens={args.student_tokens}"],
        args.num_ranks,
        log,
    )
    baseline = launch(
        out / "student_baseline",
        [*data, "teacher=null", f"run.total_tokens={args.student_tokens}"],
        args.num_ranks,
        log,
    )

    log("evaluating the three exported models on the whole held-out split")
    seq_len = 256
    runs = {"teacher": teacher, "student_kd": kd, "student_baseline": baseline}
    evals = {name: evaluate_model(m["export_dir"], data_dir, seq_len=seq_len) for name, m in runs.items()}
    result = {
        "teacher_val_loss": evals["teacher"]["loss"],
        "student_kd_val_loss": evals["student_kd"]["loss"],
        "student_baseline_val_loss": evals["student_baseline"]["loss"],
        "kd_minus_baseline": evals["student_kd"]["loss"] - evals["student_baseline"]["loss"],
        "student_export_dir": kd["export_dir"],
        "tensorboard_dir": str(out),
        "held_out_tokens": evals["teacher"]["tokens"],
        "runs": {
            name: {**m, "held_out_loss": evals[name]["loss"], "held_out_ppl": evals[name]["ppl"]}
            for name, m in runs.items()
        },
        "wall_s": round(time.time() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))

    print(f"\nheld-out loss on {evals['teacher']['tokens']} tokens of unseen standard-library files (nats/token)\n")
    print(f"{'model':<18}{'params':>10}{'train tokens':>14}{'val loss':>10}{'val ppl':>10}")
    for name, m in runs.items():
        e = evals[name]
        print(f"{name:<18}{m['student_params'] / 1e6:>9.2f}M{m['tokens_seen']:>14}{e['loss']:>10.4f}{e['ppl']:>10.2f}")
    verdict = "beats" if result["kd_minus_baseline"] < 0 else "does NOT beat"
    print(f"\nthe KD student {verdict} the baseline by {abs(result['kd_minus_baseline']):.4f} nats/token")
    print(f"summary: {out / 'summary.json'}   TensorBoard: tensorboard --logdir {out}   ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
