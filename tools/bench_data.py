"""Benchmark the data path: preparation tokens/s per worker, loader tokens/s per rank, resume time and loader memory.

``python tools/bench_data.py [--json PATH]`` measures, on this machine:

1. **prepare**: ``tools/prepare_data.py``'s code on Python standard-library source files (a real corpus on every
   machine) with a sentencepiece tokenizer trained on them, with 1 and ``--workers`` processes: tokens/s in all and
   per worker.
2. **loader**: ``TokenWindowLoader`` micro-batches per second on one rank over a synthetic corpus in the page cache
   (``--loader-tokens`` tokens in documents of 200-2000 tokens), at ``--seq-len`` x ``--micro``: one source with
   ``data.documents`` off, bos and isolated, and a mixture of three sources; read directly and through the
   prefetching thread. The step does nothing else here: the figures are what the loader can deliver.
3. **resume**: a synthetic index of ``--big-tokens`` tokens (sparse shard files: nothing is written but the index),
   opened, resumed at a position deep in its third epoch and read: wall time and the loader's peak heap memory
   (tracemalloc), against the same at a corpus 100x smaller. The memory must not depend on the corpus size.

Figures of a run on the CPU development machine are in the README (section "Data at scale").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from minima.data import Source, TokenWindowLoader
from minima.shards import ShardWriter, TokenShards, companion, sample_sha256, write_index

TOKENIZER = {"kind": "synthetic", "source": "bench_data", "sha256": "0" * 64, "vocab_size": 32000}
BOS, EOS = 1, 2


def synthetic_split(out: Path, num_tokens: int, seed: int, shard_tokens: int = 2**26) -> TokenShards:
    """Documents of 200-2000 random tokens, BOS first and EOS last, written as a real split."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out, vocab_size=32000, shard_tokens=shard_tokens)
    written = 0
    while written < num_tokens:
        n = int(rng.integers(200, 2000))
        doc = rng.integers(3, 32000, size=n, dtype=np.int64)
        doc[0], doc[-1] = BOS, EOS
        writer.add(doc)
        written += n
    entries = writer.close()
    write_index(out, entries, vocab_size=32000, eos_id=EOS, bos_id=BOS, tokenizer=TOKENIZER,
                num_documents=writer.num_documents, bos_per_document=True)  # fmt: skip
    return TokenShards.open(out)


def sparse_split(out: Path, num_tokens: int, shard_tokens: int = 2**27) -> Path:
    """An index of ``num_tokens`` uint16 tokens over sparse (unwritten) shard files: a corpus of any size, instantly.

    The files' full sha256 is not computed (nothing verifies it here); sizes and sample digests are real.
    """
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, start in enumerate(range(0, num_tokens, shard_tokens)):
        n = min(shard_tokens, num_tokens - start)
        name = f"shard_{i:05d}.bin"
        with open(out / name, "wb") as f:
            f.truncate(2 * n)
        (out / companion(name, "docs")).write_bytes(b"")
        entries.append({"file": name, "num_tokens": n, "num_doc_starts": 0, "sha256": "0" * 64,
                        "sample_sha256": sample_sha256(out / name), "docs_sha256": "0" * 64,
                        "docs_sample_sha256": sample_sha256(out / companion(name, "docs"))})  # fmt: skip
    write_index(out, entries, vocab_size=32000, eos_id=EOS, bos_id=BOS, tokenizer=TOKENIZER, num_documents=1)
    return out


def loader_rate(sources, seq_len: int, micro: int, seconds: float, **kwargs) -> dict:
    """Tokens/s of one rank's loader (batches taken back to back for ``seconds``)."""
    loader = TokenWindowLoader(sources, seq_len=seq_len, micro_batch_size=micro, seed=7, **kwargs)
    for _ in range(3):
        next(loader)  # warm: the prefetching thread started, first pages mapped
    batches, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        next(loader)
        batches += 1
    elapsed = time.perf_counter() - started
    loader.close()
    return {"tokens_per_s": round(batches * micro * seq_len / elapsed), "batches": batches}


def step_wait(sources, seq_len: int, micro: int, accum: int, step_s: float, steps: int, prefetch: int) -> dict:
    """The time a training step waits for its ``accum`` micro-batches when each step then computes for ``step_s``
    (a sleep: the GPU's share of a step, which leaves the CPU to the loader's thread)."""
    loader = TokenWindowLoader(sources, seq_len=seq_len, micro_batch_size=micro, seed=7, prefetch=prefetch * accum)
    waits = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        _ = [next(loader) for _ in range(accum)]
        waits.append(time.perf_counter() - started)
        time.sleep(step_s)
    loader.close()
    waits = waits[1:]  # the first step waits for the thread's start
    return {"mean_wait_ms": round(1e3 * sum(waits) / len(waits), 3), "max_wait_ms": round(1e3 * max(waits), 3)}


def bench_loader(root: Path, num_tokens: int, seq_len: int, micro: int, seconds: float) -> dict:
    one = synthetic_split(root / "one", num_tokens, seed=1)
    mix = [Source(name, synthetic_split(root / name, num_tokens // 3, seed=i + 2), w)
           for i, (name, w) in enumerate([("pile", 0.6), ("github", 0.1), ("wudao", 0.3)])]  # fmt: skip
    for shards in [one] + [s.shards for s in mix]:  # into the page cache
        for shard in shards.shards:
            np.asarray(shard).sum()
    results = {}
    for name, sources, kwargs in [
        ("one source, documents=off", one, {"documents": "off"}),
        ("one source, documents=bos", one, {"documents": "bos"}),
        ("one source, documents=isolated", one, {"documents": "isolated"}),
        ("mixture of 3, documents=bos", mix, {"documents": "bos"}),
        ("one source, documents=bos, prefetch=4", one, {"documents": "bos", "prefetch": 4}),
        ("mixture of 3, documents=isolated, prefetch=4", mix, {"documents": "isolated", "prefetch": 4}),
    ]:
        results[name] = loader_rate(sources, seq_len, micro, seconds, **kwargs)
        print(f"loader  {name:48s} {results[name]['tokens_per_s'] / 1e6:8.1f} M tokens/s per rank", file=sys.stderr)
    for prefetch in (0, 2):  # a step of 8 micro-batches computing 50 ms (a 3B student's step is seconds)
        r = step_wait(mix, seq_len, micro, accum=8, step_s=0.05, steps=20, prefetch=prefetch)
        results[f"step wait, mixture of 3, prefetch={prefetch} steps"] = r
        print(f"loader  the step waits {r['mean_wait_ms']:.2f} ms (max {r['max_wait_ms']:.2f}) for its 8 micro-batches"
              f" with data.prefetch={prefetch}", file=sys.stderr)  # fmt: skip
    return results


def resume_cost(split_dirs: list[Path], seq_len: int, micro: int) -> dict:
    """Open, resume deep in the third epoch and read one batch: wall time and peak heap (tracemalloc)."""
    tracemalloc.start()
    started = time.perf_counter()
    sources = [Source(d.name, TokenShards.open(d), 1.0) for d in split_dirs]
    loader = TokenWindowLoader(sources, seq_len=seq_len, micro_batch_size=micro, world_size=8, rank=5)
    position = 2 * loader.windows_per_epoch + loader.windows_per_epoch // 3
    loader.load_state_dict({**loader.state_dict(), "position": position})
    batch = next(loader)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert batch.input_ids.shape == (micro, seq_len)
    tokens = sum(s.shards.num_tokens for s in sources)
    return {"tokens": tokens, "position": position, "seconds": round(elapsed, 3), "peak_heap_mib": peak / 2**20}


def bench_resume(root: Path, big_tokens: int, seq_len: int, micro: int) -> dict:
    results = {}
    for label, tokens in (("small", big_tokens // 100), ("large", big_tokens)):
        one = [sparse_split(root / f"{label}_a", tokens)]
        three = [sparse_split(root / f"{label}_{x}", tokens // 3) for x in "bcd"]
        for name, dirs in (("one source", one), ("mixture of 3", three)):
            r = resume_cost(dirs, seq_len, micro)
            results[f"{name}, {label}"] = r
            line = f"resume  {name:14s} {r['tokens']:>14,d} tokens at window {r['position']:>11,d}: "
            print(f"{line}{r['seconds'] * 1e3:7.1f} ms, peak heap {r['peak_heap_mib']:6.2f} MiB", file=sys.stderr)
    return results


def bench_prepare(root: Path, workers: int, max_files: int) -> dict:
    from minima.prepare import prepare_data, train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts)[:max_files]
    inputs = root / "corpus"
    inputs.mkdir(parents=True)
    for i, f in enumerate(files):
        (inputs / f"{i:05d}.py").write_bytes(f.read_bytes())
    tokenizer = train_tokenizer([inputs], root / "tokenizer", vocab_size=4096)
    results = {"files": len(files), "input_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1)}
    for n in sorted({1, workers}):
        started = time.perf_counter()
        summary = prepare_data([inputs], tokenizer, root / f"out{n}", workers=n)
        elapsed = time.perf_counter() - started
        tokens = summary["train"]["tokens"] + summary["valid"]["tokens"]
        results[f"workers={n}"] = {"tokens": tokens, "seconds": round(elapsed, 2),
                                   "tokens_per_s": round(tokens / elapsed),
                                   "tokens_per_worker_second": summary.get("tokens_per_worker_second")}  # fmt: skip
        print(f"prepare {n} worker(s): {tokens:,d} tokens in {elapsed:.1f} s = {tokens / elapsed / 1e6:.2f} M tokens/s"
              f" (sentencepiece BPE 4096 as a Hugging Face tokenizer)", file=sys.stderr)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=8, help="windows per micro-batch")
    parser.add_argument("--loader-tokens", type=int, default=2**27, help="tokens of the synthetic loader corpus")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per loader measurement")
    parser.add_argument("--big-tokens", type=int, default=10**10, help="tokens of the synthetic resume index")
    parser.add_argument("--workers", type=int, default=2, help="prepare processes to compare with 1")
    parser.add_argument("--prepare-files", type=int, default=600, help="stdlib files for the prepare benchmark")
    parser.add_argument("--skip", nargs="*", default=[], choices=["prepare", "loader", "resume"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = {"seq_len": args.seq_len, "micro": args.micro}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: per-worker figures compare
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        if "resume" not in args.skip:
            results["resume"] = bench_resume(root / "resume", args.big_tokens, args.seq_len, args.micro)
        if "loader" not in args.skip:
            results["loader"] = bench_loader(root / "loader", args.loader_tokens, args.seq_len, args.micro,
                                             args.seconds)  # fmt: skip
        if "prepare" not in args.skip:
            results["prepare"] = bench_prepare(root / "prepare", args.workers, args.prepare_files)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
