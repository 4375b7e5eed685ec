"""The data tools run end to end on tiny inputs: tools/inspect_data.py and tools/bench_data.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from minima.shards import companion

REPO = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_inspect_data_shows_the_windows_the_trainer_reads(tiny_prepared_data: Path) -> None:
    proc = run_tool("tools/inspect_data.py", "tiny_cpu", f"data.dir={tiny_prepared_data}", "data.seq_len=64",
                    "data.documents=isolated", "--windows", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "train:" in out and "valid:" in out and "document tokens: documents" in out
    assert out.count("  window ") == 4 and "documents {" in out and "'isolated'" in out
    assert "labels:" in out and "<s>" in out  # BOS shown as its token
    summary = json.loads(
        run_tool("tools/inspect_data.py", "tiny_cpu", f"data.dir={tiny_prepared_data}", "--json").stdout
    )
    (split,) = summary.values()
    assert split["train"]["tokens"] > 0 and split["train"]["document_lengths"]["documents"] > 0
    bad = run_tool("tools/inspect_data.py", "tiny_cpu", f"data.dir={tiny_prepared_data / 'nowhere'}")
    assert bad.returncode == 2 and "index.json not found" in bad.stderr


def test_bench_data_reports_loader_and_resume_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_tool("tools/bench_data.py", "--skip", "prepare", "--seq-len", "256", "--micro", "2",
                    "--loader-tokens", "300000", "--seconds", "0.2", "--big-tokens", "100000000",
                    "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    rates = [r for name, r in figures["loader"].items() if not name.startswith("step wait")]
    assert rates and all(r["tokens_per_s"] > 0 for r in rates)
    resume = figures["resume"]
    assert resume["one source, large"]["tokens"] == 10**8 and resume["one source, small"]["tokens"] == 10**6
    assert all(r["seconds"] < 30 for r in resume.values())


def test_verify_data_checks_every_file_of_every_source(tiny_prepared_data: Path, tmp_path: Path) -> None:
    mix = tmp_path / "mix"
    for name in ("web", "code"):
        shutil.copytree(tiny_prepared_data / "train", mix / name / "train")
        shutil.copytree(tiny_prepared_data / "valid", mix / name / "valid")
    ok = run_tool("tools/verify_data.py", str(mix))
    assert ok.returncode == 0 and ok.stderr.count("tokens checked") == 4, ok.stderr
    split = mix / "code" / "train"
    docs = split / companion(json.loads((split / "index.json").read_text())["shards"][0]["file"], "docs")
    data = bytearray(docs.read_bytes())
    data[-1] ^= 0x01  # a document start moved: the sample check at open catches the last bytes too
    docs.write_bytes(bytes(data))
    bad = run_tool("tools/verify_data.py", str(mix))
    assert bad.returncode == 2 and docs.name in bad.stderr
    data[-1] ^= 0x01
    docs.write_bytes(bytes(data))
    assert run_tool("tools/verify_data.py", str(split)).returncode == 0
