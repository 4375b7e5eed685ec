"""Held-out loss of exported Hugging Face models on prepared shards, in one plain PyTorch process (no DeepSpeed).

    python -m minima.evaluate --data runs/demo/data --seq-len 256 runs/demo/teacher/export runs/demo/student_kd/export

Loads each directory with ``AutoModelForCausalLM.from_pretrained``, so it also checks that an export is usable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from minima.data import eval_batches
from minima.losses import kd_loss_from_hidden
from minima.models import last_hidden, output_head
from minima.shards import TokenShards


@torch.no_grad()
def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: str = "cpu",
    documents: str = "auto",
) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) and perplexity of ``model_dir`` on ``<data_dir>/valid`` (for chat data:
    on the labelled assistant tokens only, each conversation attended alone), windows read in the ``documents`` mode of
    training (``minima.data``)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    shards = TokenShards.open(Path(data_dir) / "valid")
    ce_sum, num_tokens = 0.0, 0
    batches = eval_batches(
        shards, seq_len=seq_len, micro_batch_size=batch_size, max_windows=max_windows, documents=documents
    )
    for mb in tqdm(batches, desc=f"eval {model_dir}", unit="batch", leave=False, file=sys.stderr, disable=None):
        positions = None if mb.position_ids is None else mb.position_ids.to(device)  # packed conversations
        hidden = last_hidden(model, mb.input_ids.to(device), positions)  # no (B, T, V) logits: chunked loss
        terms = kd_loss_from_hidden(hidden, output_head(model), mb.labels.to(device))
        ce_sum += terms.ce_sum.item()
        num_tokens += int(terms.num_tokens)
    loss = ce_sum / num_tokens
    return {"loss": loss, "ppl": math.exp(loss), "tokens": num_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minima.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="Hugging Face model directories")
    parser.add_argument(
        "--data",
        required=True,
        help="prepared data directory, or one source of a mixture (DIR/NAME); its valid/ split is used",
    )
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per window, as in training")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=None, help="first N held-out windows (default: all)")
    parser.add_argument("--documents", default="auto", choices=["auto", "off", "bos", "isolated"],
                        help="document-aware windows, as data.documents in training (default auto)")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    results = {
        m: evaluate_model(
            m,
            args.data,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_windows=args.max_windows,
            device=args.device,
            documents=args.documents,
        )
        for m in args.models
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
