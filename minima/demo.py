"""``make demo``: a miniature MiniMA pipeline that needs no download, on CPUs or GPUs.

1. Train a sentencepiece tokenizer on the CPython standard library source found on this machine.
2. Write token shards and a held-out split with ``tools/prepare_data.py``'s code.
3. Train a small teacher from scratch (``teacher=null``).
4. Size the student with the law of capacity gap (``tools/pick_student_size.py --write-config``: the top-ranked
   architecture of the teacher's family).
5. Initialise it by structured pruning of the teacher (``tools/prune_to_student.py``, calibrated on the train split).
6. Distil the pruned student (the ``tiny_cpu`` recipe: 0.5 CE + 0.5 KD at T=1).
7. Two baselines for the same tokens without KD: the same pruned init, and a random init of the same shape.
8. Evaluate the four exported Hugging Face models on the held-out shards; print a table.
9. MiniChat: question/answer conversations made from the standard library's docstrings ("What does
   `textwrap.dedent` do?" -> its docstring; ``minima.docstrings``), prepared with ``tools/prepare_chat.py``'s code;
   the distilled student instruction-tuned on them (the ``tiny_chat`` recipe, ``minima.sft``); its dev loss on
   held-out conversations before and after; one chat turn of the result with ``tools/chat.py``. summary.json.

Steps 3, 6, 7 and 9 are real ``deepspeed`` launches of ``minima.distill`` / ``minima.sft`` (2 ranks under ZeRO-3 on
CPU, or one per GPU); every command is printed so that it can be rerun by hand.
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

from minima.chat_data import prepare_chat
from minima.config import REPO_ROOT
from minima.dist import free_port
from minima.docstrings import docstring_conversations, write_jsonl
from minima.evaluate import evaluate_model
from minima.prepare import prepare_data
from minima.tokenizer import train_sentencepiece

# The demo's teacher (3.4M parameters); its student's size comes from the law of capacity gap (step 4).
TEACHER_ARCH = (
    "{model_type: llama, hidden_size: 192, intermediate_size: 512, num_hidden_layers: 6, num_attention_heads: 6,"
    " num_key_value_heads: 6, max_position_embeddings: 256, tie_word_embeddings: false}"
)
TEACHER_TOKENS = 786_432
STUDENT_TOKENS = 98_304  # while the student is below the teacher: KD helps most there (README)
VOCAB_SIZE = 2048  # small: at this width the output head is a large share of a tiny model's compute
SEQ_LEN = 256  # the tiny_cpu and tiny_chat recipes', within the teacher's max_position_embeddings
CHAT_CONVERSATIONS = 600
ZERO2 = "run.ds_config=ds_configs/zero2.json"
EVAL_TOKENS = 32768  # the runs' own held-out evaluations (the table evaluates the whole split afterwards)
CHAT_QUESTION = "What does `textwrap.dedent` do?"


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


def run_tool(script: str, args: list[str], log) -> str:
    """Run ``tools/<script>`` with this interpreter; return its standard output (its progress goes to stderr)."""
    cmd = [sys.executable, str(REPO_ROOT / "tools" / script), *args]
    log(f"$ {shlex.join(cmd)}")
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def launch(
    out_dir: Path, overrides: list[str], num_ranks: int, log, module="minima.distill", recipe="tiny_cpu"
) -> dict:
    """Run ``module`` (``minima.distill`` or ``minima.sft``) under the deepspeed launcher; return its metrics.json."""
    cmd = ["deepspeed", "--num_gpus", str(num_ranks), "--master_port", str(free_port()), "--module", module, recipe]
    cmd += [*overrides, f"run.out_dir={out_dir}"]
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
    parser.add_argument("--calib-windows", type=int, default=128, help="pruning's calibration windows")
    parser.add_argument("--chat-conversations", type=int, default=CHAT_CONVERSATIONS)
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

    data = [f"data.dir={data_dir}", f"run.eval_tokens={EVAL_TOKENS}"]
    teacher = launch(
        out / "teacher",
        # ZeRO-2 for the teacher's own training: a model this small spends a fifth of a ZeRO-3 step gathering layers
        [
            *data,
            "teacher=null",
            f"student.arch={TEACHER_ARCH}",
            f"run.total_tokens={args.teacher_tokens}",
            ZERO2,
            "run.eval_every=100",
        ],
        args.num_ranks,
        log,
    )
    teacher_dir = Path(teacher["export_dir"])

    arch_dir, init_dir = out / "student_arch", out / "student_init"
    sizing = json.loads(
        run_tool(
            "pick_student_size.py", ["--teacher", str(teacher_dir), "--json", "--write-config", str(arch_dir)], log
        )
    )
    chosen = sizing["written_config"]
    log(
        f"law of capacity gap: optimal student {sizing['optimal_student']['total_params'] / 1e6:.2f}M"
        f" ({sizing['optimal_student']['form']} form); chosen {chosen['layers']}L x {chosen['hidden']}, FFN"
        f" {chosen['ffn']} ({chosen['derivation']}), {chosen['total_params'] / 1e6:.2f}M"
    )
    prune_args = ["--teacher", str(teacher_dir), "--target", str(arch_dir), "--calib", str(data_dir / "train")]
    prune_args += ["--out", str(init_dir), "--seq-len", str(SEQ_LEN), "--calib-windows", str(args.calib_windows)]
    run_tool("prune_to_student.py", prune_args, log)

    # name: (teacher, student init); all three students get the same tokens in the same order
    students = {
        "student_kd": (f"teacher.path={teacher_dir}", init_dir),
        "student_pruned_ce": ("teacher=null", init_dir),
        "student_scratch_ce": ("teacher=null", arch_dir),  # only a config.json: a random init of the same shape
    }
    runs = {"teacher": teacher}
    for name, (teacher_override, init) in students.items():
        overrides = [*data, teacher_override, f"student={{path: {init}}}", f"run.total_tokens={args.student_tokens}"]
        runs[name] = launch(out / name, overrides, args.num_ranks, log)

    log("evaluating the exported models on the whole held-out split")
    inits = {"teacher": "random", "student_kd": "pruned", "student_pruned_ce": "pruned", "student_scratch_ce": "random"}
    evals = {name: evaluate_model(m["export_dir"], data_dir, seq_len=SEQ_LEN) for name, m in runs.items()}
    loss = {name: e["loss"] for name, e in evals.items()}
    result = {
        "teacher_val_loss": loss["teacher"],
        "student_kd_val_loss": loss["student_kd"],
        "student_pruned_ce_val_loss": loss["student_pruned_ce"],
        "student_scratch_ce_val_loss": loss["student_scratch_ce"],
        "kd_minus_ce": loss["student_kd"] - loss["student_pruned_ce"],
        "pruned_minus_scratch": loss["student_pruned_ce"] - loss["student_scratch_ce"],
        "student_size": {key: sizing[key] for key in ("law", "optimal_student", "written_config")},
        "student_export_dir": runs["student_kd"]["export_dir"],
        "tensorboard_dir": str(out),
        "held_out_tokens": evals["teacher"]["tokens"],
        "runs": {
            name: {**m, "init": inits[name], "held_out_loss": evals[name]["loss"], "held_out_ppl": evals[name]["ppl"]}
            for name, m in runs.items()
        },
    }
    result["minichat"] = minichat(out, Path(runs["student_kd"]["export_dir"]), args, log)
    result["wall_s"] = round(time.time() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(result, indent=2))

    print(f"\nheld-out loss on {evals['teacher']['tokens']} tokens of unseen standard-library files (nats/token)\n")
    print(f"{'model':<20}{'init':>8}{'params':>10}{'train tokens':>14}{'val loss':>10}{'val ppl':>10}")
    for name, m in runs.items():
        e = evals[name]
        print(
            f"{name:<20}{inits[name]:>8}{m['student_params'] / 1e6:>9.2f}M{m['tokens_seen']:>14}"
            f"{e['loss']:>10.4f}{e['ppl']:>10.2f}"
        )

    print()
    for what, gain in (
        ("KD vs CE alone, same pruned init:", -result["kd_minus_ce"]),
        ("pruned vs random init, CE alone: ", -result["pruned_minus_scratch"]),
    ):
        print(f"{what} {'better' if gain > 0 else 'NOT better'} by {gain:+.4f} nats/token")
    chat = result["minichat"]
    print(
        f"\nMiniChat stage: {chat['conversations']['train']} train / {chat['conversations']['valid']} dev"
        f" conversations; dev loss on the replies {chat['dev_loss_before']:.4f} -> {chat['dev_loss_after']:.4f}"
        f" nats/token (best step {chat['best_step']})"
    )
    print(f"you> {CHAT_QUESTION}\nassistant> {chat['reply']}\n")
    print(f"summary: {out / 'summary.json'}   TensorBoard: tensorboard --logdir {out}   ({result['wall_s']:.0f} s)")
    return 0


def minichat(out: Path, student_dir: Path, args, log) -> dict:
    """Step 9: conversations from docstrings, the chat stage on the distilled student, a chat turn of the result."""
    records = docstring_conversations(args.chat_conversations, seed=0)
    conversations = write_jsonl(records, out / "chat_raw" / "docstrings.jsonl")
    chat_dir = out / "chat"
    prepared = prepare_chat([conversations], student_dir, chat_dir, seq_len=SEQ_LEN, valid_fraction=0.08, seed=0)
    log(f"chat data: {json.dumps(prepared, default=str)}")
    before = evaluate_model(student_dir, chat_dir, seq_len=SEQ_LEN)
    sft = launch(
        out / "minichat",
        [f"data.dir={chat_dir}", f"student={{path: {student_dir}}}"],
        args.num_ranks,
        log,
        module="minima.sft",
        recipe="tiny_chat",
    )
    after = evaluate_model(sft["export_dir"], chat_dir, seq_len=SEQ_LEN)
    chat_args = [sft["export_dir"], "--prompt", CHAT_QUESTION, "--max-new-tokens", "48"]
    chat_args += ["--repetition-penalty", "1.5", "--no-repeat-ngram-size", "2"]  # a tiny model loops without them
    reply = run_tool("chat.py", chat_args, log).strip()
    return {
        "conversations": {split: prepared[split]["conversations"] for split in ("train", "valid")},
        "dev_loss_before": before["loss"],
        "dev_loss_after": after["loss"],
        "dev_label_tokens": after["tokens"],
        "best_step": sft["early_stopping"]["best_step"],
        "steps": sft["step"],
        "export_dir": sft["export_dir"],
        "question": CHAT_QUESTION,
        "reply": reply,
    }


if __name__ == "__main__":
    sys.exit(main())
