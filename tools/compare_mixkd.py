#!/usr/bin/env python
"""MixKD in miniature: KD against KD + MixKD (``kd.mixup.*``, minima.mixup) in the two settings where data is
scarce, each pair from the same student init, the same teacher, the same seed and the same tokens in the same order.

Run after ``make demo`` (it reuses the demo's data, teacher, pruned init, distilled student and conversations)::

    python tools/compare_mixkd.py --demo runs/demo --out runs/mixkd_compare

(a) **Limited data, pretraining.** The training split is a small slice of the demo's: the first ``--train-windows``
windows of ``seq_len`` tokens of its first shard, cut at the same document starts (OUT/limited_data/train); the
held-out split is the demo's whole valid split, copied beside it (documents no run trained on). The pruned student
(``runs/demo/student_init``) is distilled from the demo teacher for ``--epochs`` passes over the slice (48 windows
x 8 epochs: 24 steps of 4096 tokens) with the ``tiny_cpu`` recipe (0.5 CE + 0.5 KD, forward KL at T=1).
(b) **The chat stage's small conversation set.** ``minima.sft`` with the ``tiny_chat`` recipe on the demo's
docstring conversations (``runs/demo/chat``) from the demo's distilled student, with the demo teacher as teacher
(``tiny_chat`` has none: ``teacher.path=...`` and ``kd.kd_weight=0.5`` next to its CE weight 1, as the recipe says);
trained for ``--chat-epochs`` passes (2, to fit the comparison in ~8 minutes on 2 CPU cores; the recipe's 3 with
``--chat-epochs 3``); its early stopping on the dev loss (every 10 steps) picks the export of each run.

In each pair only ``kd.mixup.enabled=true`` differs (the defaults: every micro-batch mixed, prob 1; lambda ~
Beta(0.4, 0.4); mixed tokens weight 1), with micro-batches of 8 sequences (MixKD pairs sequences within one). Both
runs read the same original tokens; the MixKD run also trains on one mixed copy of each micro-batch (twice the
forward and backward work). Every number in the table is a held-out loss in nats/token on the whole held-out split
(for chat: the assistant tokens of the dev conversations), measured on the run's export with
``minima.evaluate.evaluate_model``; the run's own final evaluation (``run.eval_tokens=0``: the same whole split) is
shown beside it as a check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from minima.demo import SEQ_LEN, launch
from minima.evaluate import evaluate_model
from minima.shards import TokenShards, write_shards

MIXUP = ["kd.mixup.enabled=true"]  # prob 1, alpha 0.4, weight 1: MixupConfig's defaults


def limited_data(demo_data: Path, out: Path, windows: int) -> dict:
    """``out``: the first ``windows`` training windows of ``demo_data``'s first train shard (whole documents but the
    last, cut at the window end) as ``out/train``; ``demo_data``'s tokenizer and whole valid split copied beside."""
    shards = TokenShards.open(demo_data / "train")
    num_tokens = windows * SEQ_LEN + 1  # a window is seq_len + 1 tokens at stride seq_len
    if len(shards.shards[0]) < num_tokens:
        raise SystemExit(f"{demo_data}/train's first shard has fewer than {num_tokens} tokens: give --train-windows")
    tokens = np.asarray(shards.shards[0][:num_tokens])
    starts = [int(s) for s in shards.doc_starts[0] if s < num_tokens]
    assert starts[0] == 0 and tokens[0] == shards.bos_id, "the first shard should start with a document"
    documents = [tokens[a:b] for a, b in zip(starts, [*starts[1:], num_tokens], strict=True)]
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("tokenizer", "valid"):
        shutil.copytree(demo_data / sub, out / sub)
    index = shards.index
    write_shards(
        out / "train",
        documents,
        vocab_size=index["vocab_size"],
        eos_id=index["eos_id"],
        bos_id=index["bos_id"],
        tokenizer=index["tokenizer"],
        shard_tokens=num_tokens,
        bos_per_document=index["bos_per_document"],
    )
    return {"windows": windows, "tokens": num_tokens, "documents": len(documents), "of_demo_tokens": shards.num_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a `make demo` directory")
    parser.add_argument("--out", type=Path, default=Path("runs/mixkd_compare"))
    parser.add_argument("--train-windows", type=int, default=48, help=f"(a)'s training windows of {SEQ_LEN} tokens")
    parser.add_argument("--epochs", type=float, default=8, help="(a)'s passes over its training windows")
    parser.add_argument("--chat-epochs", type=float, default=2, help="(b)'s passes (tiny_chat's: 3)")
    parser.add_argument("--num-ranks", type=int, default=1)
    args = parser.parse_args(argv)
    teacher_dir, data_dir, chat_dir = args.demo / "teacher" / "export", args.demo / "data", args.demo / "chat"
    init_dir, distilled_dir = args.demo / "student_init", args.demo / "student_kd" / "export"
    needs = [teacher_dir / "config.json", data_dir / "train" / "index.json", init_dir / "config.json"]
    needs += [distilled_dir / "config.json", chat_dir / "train" / "index.json"]
    for need in needs:
        if not need.exists():
            raise SystemExit(f"{need} not found: run `make demo` first (or give --demo DIR of a finished demo)")
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[compare_mixkd {time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    limited_dir = args.out / "limited_data"
    limited = limited_data(data_dir, limited_dir, args.train_windows)
    log(f"limited data: {json.dumps(limited)} -> {limited_dir}")

    teacher = [f"teacher.path={teacher_dir}"]
    pretrain = [f"data.dir={limited_dir}", *teacher, f"student={{path: {init_dir}}}", f"run.epochs={args.epochs}"]
    pretrain += ["run.eval_every=0", "run.eval_tokens=0", "run.save_every=0"]
    chat = [f"data.dir={chat_dir}", *teacher, "kd.kd_weight=0.5", f"student={{path: {distilled_dir}}}"]
    chat += [f"run.epochs={args.chat_epochs}"]
    settings = {  # setting: (module, recipe, overrides, data whose valid split is the held-out measure)
        "limited_pretrain": ("minima.distill", "tiny_cpu", pretrain, limited_dir),
        "chat": ("minima.sft", "tiny_chat", chat, chat_dir),
    }
    rows = []
    for setting, (module, recipe, overrides, held_out_data) in settings.items():
        for kind, extra in (("kd", []), ("mixkd", MIXUP)):
            run_dir = args.out / f"{setting}_{kind}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a previous comparison's checkpoints would be resumed
            t_run = time.time()
            metrics = launch(run_dir, [*overrides, *extra], args.num_ranks, log, module=module, recipe=recipe)
            train_s = time.time() - t_run
            held_out = evaluate_model(metrics["export_dir"], held_out_data, seq_len=SEQ_LEN)
            stopping = metrics.get("early_stopping") or {}
            rows.append(
                {
                    "name": f"{setting}_{kind}",
                    "setting": setting,
                    "objective": kind,
                    "recipe": recipe,
                    "overrides": [*overrides, *extra],
                    "steps": metrics["step"],
                    "best_step": stopping.get("best_step"),
                    "tokens": metrics["tokens_seen"],
                    "held_out_loss": held_out["loss"],
                    "held_out_tokens": held_out["tokens"],
                    "run_val_loss": metrics["val_loss"],
                    "train_s": round(train_s, 1),
                    "export_dir": metrics["export_dir"],
                }
            )
            log(f"{setting}_{kind}: held-out loss {held_out['loss']:.4f} ({train_s:.0f} s)")
    summary = {"teacher": str(teacher_dir), "limited_data": limited, "num_ranks": args.num_ranks, "rows": rows}
    summary["wall_s"] = round(time.time() - t_start, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(
        f"\n(a) {limited['tokens']} training tokens ({limited['windows']} windows, {limited['documents']} documents)"
        f" of the demo's {limited['of_demo_tokens']}, {args.epochs:g} epochs; (b) the demo's chat conversations."
        f"\nheld-out loss (nats/token) on the whole held-out split, teacher {teacher_dir}\n"
    )
    print(
        f"{'run':<24}{'steps':>6}{'best':>6}{'tokens':>9}{'held out':>10}{'tokens':>8}{'run val':>9}"
        f"{'MixKD-KD':>10}{'train s':>9}"
    )
    for row in rows:
        kd = next(r for r in rows if r["setting"] == row["setting"] and r["objective"] == "kd")
        delta = "" if row is kd else f"{row['held_out_loss'] - kd['held_out_loss']:+.4f}"
        best = "" if row["best_step"] is None else str(row["best_step"])
        print(
            f"{row['name']:<24}{row['steps']:>6}{best:>6}{row['tokens']:>9}{row['held_out_loss']:>10.4f}"
            f"{row['held_out_tokens']:>8}{row['run_val_loss']:>9.4f}{delta:>10}{row['train_s']:>9.0f}"
        )
    print(f"\nsummary: {args.out / 'summary.json'}  ({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
