"""Look at prepared data before spending GPU hours on it: ``python tools/inspect_data.py RECIPE [overrides]``.

Reads the data a run would read (``data.dir``, ``data.sources``, ``data.seq_len``, ``data.documents``, ``data.seed``
of the recipe and overrides, e.g. ``tools/inspect_data.py llama2_7b_to_3b data.dir=/data/mix``) and prints:

- per source and split: shards, tokens, documents, bytes on disk, the tokenizer they were prepared with, and (with
  ``--shards``) one line per shard;
- document lengths in tokens (count, mean, percentiles, max; over the first ``--max-documents`` documents);
- the first ``--windows`` training windows exactly as the trainer's loader yields them (rank 0 of 1, the run's seed
  and mixture): their source, the decoded text of each piece (one line per document: where positions restart, or
  at each BOS when attention spans the window), BOS and EOS shown as their tokens, and which labels are ignored
  and why.

Nothing is written. Exits 2 with a message naming the file or key when the data or the recipe is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from minima.config import ConfigError, load_config, recipe_names
from minima.data import Source, TokenWindowLoader
from minima.shards import DOC_DTYPE, IGNORE_INDEX, DataError, TokenShards


def split_summary(shards: TokenShards) -> dict:
    entries = shards.index["shards"]
    size = sum(e["num_tokens"] * shards.dtype.itemsize + e.get("num_doc_starts", 0) * DOC_DTYPE.itemsize
               for e in entries)  # fmt: skip
    return {
        "path": str(shards.path),
        "shards": len(entries),
        "tokens": shards.num_tokens,
        "documents": shards.index["num_documents"],
        "bytes": size,
        "dtype": shards.index["dtype"],
        "bos_per_document": shards.bos_per_document,
        "tokenizer": {k: shards.tokenizer.get(k) for k in ("kind", "source", "vocab_size")},
    }


def document_lengths(shards: TokenShards, max_documents: int) -> dict | None:
    """Length statistics of the first ``max_documents`` documents (None when the split records no boundaries)."""
    if shards.doc_starts is None:
        return None
    starts, base = [], 0
    for tokens, doc_starts in zip(shards.shards, shards.doc_starts, strict=True):
        starts.append(np.asarray(doc_starts[: max_documents + 1], dtype=np.int64) + base)
        base += len(tokens)
        if sum(len(s) for s in starts) > max_documents:
            break
    starts = np.concatenate([*starts, [base]])[: max_documents + 1]
    lengths = np.diff(starts)
    if lengths.size == 0:
        return {"documents": 0}
    p = np.percentile(lengths, [10, 50, 90, 99]).round().astype(int).tolist()
    return {"documents": int(lengths.size), "mean": round(float(lengths.mean()), 1), "min": int(lengths.min()),
            "p10": p[0], "median": p[1], "p90": p[2], "p99": p[3], "max": int(lengths.max())}  # fmt: skip


def describe_window(tokenizer, input_ids, labels, position_ids, chars: int) -> list[str]:
    """Lines showing one window: each piece between position restarts, decoded, and the ignored labels."""
    T = len(input_ids)
    if position_ids is not None:  # isolated documents, packed conversations: where positions restart
        restarts = [int(t) for t in np.flatnonzero(position_ids == 0)]
    else:  # one sequence: show where documents begin (their BOS), if they carry one
        restarts = sorted({0, *np.flatnonzero(input_ids == tokenizer.bos_token_id).tolist()})
    lines = []
    for start, stop in zip(restarts, [*restarts[1:], T], strict=True):
        text = tokenizer.decode(input_ids[start:stop].tolist(), skip_special_tokens=False)
        text = text if len(text) <= chars else text[: chars // 2] + " [...] " + text[-chars // 2 :]
        lines.append(f"    | tokens {start}-{stop - 1} ({stop - start}): {text!r}")
    ignored = np.flatnonzero(labels == IGNORE_INDEX).tolist()
    why = []
    for t in ignored[:8]:
        if t == 0 and input_ids[0] == tokenizer.bos_token_id:
            why.append("0 (BOS put at a window starting mid-document)")
        elif position_ids is not None and t + 1 < T and position_ids[t + 1] == 0:
            why.append(f"{t} (its next token starts another document)")
        else:
            why.append(str(t))
    more = f" and {len(ignored) - 8} more" if len(ignored) > 8 else ""
    lines.append(f"    labels: {T - len(ignored)} of {T} counted; ignored at {', '.join(why) or 'none'}{more}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help=f"a recipe YAML path or one of {recipe_names()}")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.dir=/data/mix")
    parser.add_argument("--windows", type=int, default=3, help="training windows to show (default 3)")
    parser.add_argument("--chars", type=int, default=300, help="characters shown per document piece (default 300)")
    parser.add_argument("--shards", action="store_true", help="also list every shard")
    parser.add_argument("--max-documents", type=int, default=1_000_000, help="documents in the length statistics")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (no windows)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        data_dir = Path(cfg.data.dir)
        names = cfg.data.sources or {"": 1.0}
        summary, sources = {}, []
        for name, weight in names.items():
            splits = {split: TokenShards.open(data_dir / name / split) for split in ("train", "valid")}
            sources.append(Source(name, splits["train"], weight))
            summary[name or str(data_dir)] = {"weight": weight / sum(names.values())}
            for split, s in splits.items():
                lengths = document_lengths(s, args.max_documents)
                summary[name or str(data_dir)][split] = {**split_summary(s), "document_lengths": lengths}
            if args.shards:
                for split, s in splits.items():
                    summary[name or str(data_dir)][split]["per_shard"] = [
                        {k: e.get(k) for k in ("file", "num_tokens", "num_doc_starts")} for e in s.index["shards"]
                    ]
        loader = TokenWindowLoader(sources, seq_len=cfg.data.seq_len, micro_batch_size=1, seed=cfg.data.seed,
                                   documents=cfg.data.documents)  # fmt: skip
    except (ConfigError, DataError) as e:
        print(f"inspect_data: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for name, info in summary.items():
        print(f"source {name} (weight {info['weight']:.3f})")
        for split in ("train", "valid"):
            s = info[split]
            print(f"  {split}: {s['tokens']:,} tokens, {s['documents']:,} documents, {s['shards']} shards, "
                  f"{s['bytes'] / 2**30:.2f} GiB ({s['dtype']}); BOS per document: {s['bos_per_document']}; "
                  f"tokenizer {s['tokenizer']['source']} ({s['tokenizer']['vocab_size']} ids)")  # fmt: skip
            if s["document_lengths"]:
                d = s["document_lengths"]
                print("    document tokens: " + ", ".join(f"{k} {v:,}" for k, v in d.items()))
            for e in s.get("per_shard", []):
                print(f"    {e['file']}: {e['num_tokens']:,} tokens, {e['num_doc_starts']:,} documents start")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    modes = {s.name or str(data_dir): w.mode for s, w in zip(sources, loader.windows, strict=True)}
    print(f"\nthe first {args.windows} training windows (seq_len {cfg.data.seq_len}, documents {modes}, seed "
          f"{cfg.data.seed}), as the loader yields them:")  # fmt: skip
    source_of, _ = loader.mixture.assign(np.arange(args.windows))
    for i in range(args.windows):
        batch = next(loader)
        positions = None if batch.position_ids is None else batch.position_ids[0].numpy()
        print(f"  window {i} from {sources[int(source_of[i])].name or data_dir}:")
        lines = describe_window(tokenizer, batch.input_ids[0].numpy(), batch.labels[0].numpy(), positions, args.chars)
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
