"""The law of capacity gap (``minima.law``) and its CLI: exact parameter counts against transformers models built on
the meta device, the students it derives, refitting, teacher ranking, assistant chains and MiniDisc's selection."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minima.law import (
    DERIVATIONS,
    FFN_MULTIPLE,
    HIDDEN_MULTIPLE,
    PUBLISHED_LAW,
    Arch,
    Law,
    LawError,
    assistant_chain,
    fit_law,
    load_arch,
    parse_count,
    preset_names,
    rank_teachers,
    read_assistants,
    read_results,
    select_assistant,
    student_candidates,
)

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "pick_student_size.py"

# Total parameters of the public checkpoints the presets copy (sum of numel of the released weights).
PUBLISHED_COUNTS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "mistral-7b": 7_241_732_096,
    "llama3-8b": 8_030_261_248,
    "qwen2.5-7b": 7_615_616_512,
}

# The demo's teacher: ~3.4M parameters, below the affine form's domain.
TINY_TEACHER = {
    "model_type": "llama",
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "vocab_size": 2048,
    "tie_word_embeddings": False,
    "max_position_embeddings": 256,
}

# Families and options the presets do not cover.
FAMILY_CASES = {
    # Qwen2.5-3B's shape: tied embeddings, GQA 16/2, hard-wired q/k/v biases
    "qwen2-tied-gqa": {
        "model_type": "qwen2",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # Qwen3-4B's shape: per-head q/k norms, head_dim 128 with 32 heads in a 2560 hidden (attention width != hidden)
    "qwen3-qk-norm-tied": {
        "model_type": "qwen3",
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # llama with every bias switched on, GQA 12/4 and head_dim 128 in a 768 hidden
    "llama-biases-gqa": {
        "model_type": "llama",
        "hidden_size": 768,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "attention_bias": True,
        "mlp_bias": True,
        "vocab_size": 1000,
        "tie_word_embeddings": False,
    },
    "mistral-tied-gqa": {
        "model_type": "mistral",
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    },
}
PUBLISHED_FAMILY_COUNTS = {"qwen2-tied-gqa": 3_085_938_688, "qwen3-qk-norm-tied": 4_022_468_096}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def hf_counts(config) -> tuple[int, int]:
    """(total, embedding) parameters of the transformers model of ``config``, built on the meta device (no memory).

    ``named_parameters`` lists a tied output head once, under the input embedding."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    named = dict(model.named_parameters())
    embedding = sum(p.numel() for n, p in named.items() if "embed_tokens" in n or n.startswith("lm_head"))
    return sum(p.numel() for p in named.values()), embedding


def write_config(directory: Path, fields: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(fields))
    return path


def assert_counts_match(arch: Arch) -> None:
    total, embedding = hf_counts(arch.to_hf_config())
    assert arch.total_params() == total, arch.name
    assert arch.embedding_params() == embedding, arch.name
    assert arch.non_embedding_params() == total - embedding, arch.name


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Arch:
    return load_arch(write_config(tmp_path_factory.mktemp("tiny_teacher"), TINY_TEACHER))


@pytest.fixture(scope="module")
def tool():
    """``tools/pick_student_size.py`` as a module, to call ``main(argv)`` in-process (a subprocess costs ~3 s)."""
    spec = importlib.util.spec_from_file_location("pick_student_size", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("name", preset_names())
def test_preset_counts_equal_the_transformers_model_and_the_public_checkpoint(name):
    arch = load_arch(name)
    assert arch.total_params() == PUBLISHED_COUNTS[name]
    assert_counts_match(arch)


@pytest.mark.parametrize("name", preset_names())
def test_every_candidate_config_of_a_preset_counts_exactly(name):
    teacher = load_arch(name)
    candidates = student_candidates(teacher, PUBLISHED_LAW.optimal_student(teacher.total_params()).params)
    assert {c.derivation for c in candidates} == set(DERIVATIONS)
    for c in candidates:
        assert_counts_match(c.arch)


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_family_options_count_exactly_for_the_config_and_its_candidates(case, tmp_path):
    arch = load_arch(write_config(tmp_path, FAMILY_CASES[case]))
    if case in PUBLISHED_FAMILY_COUNTS:
        assert arch.total_params() == PUBLISHED_FAMILY_COUNTS[case]
    assert_counts_match(arch)
    for c in student_candidates(arch, PUBLISHED_LAW.optimal_student(arch.total_params()).params):
        assert c.arch.tie_word_embeddings == arch.tie_word_embeddings
        assert (c.arch.qkv_bias, c.arch.o_bias, c.arch.mlp_bias, c.arch.qk_norm) == (
            arch.qkv_bias,
            arch.o_bias,
            arch.mlp_bias,
            arch.qk_norm,
        )
        assert_counts_match(c.arch)


def test_family_flags_are_read_from_the_config(tmp_path):
    qwen2 = load_arch(write_config(tmp_path / "qwen2", FAMILY_CASES["qwen2-tied-gqa"]))
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.mlp_bias, qwen2.num_kv_heads) == (True, False, False, 2)
    assert qwen2.embedding_params() == 151936 * 2048  # tied: the head shares the input embedding
    llama = load_arch(write_config(tmp_path / "llama", FAMILY_CASES["llama-biases-gqa"]))
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.head_dim) == (True, True, True, 128)
    assert load_arch(write_config(tmp_path / "qwen3", FAMILY_CASES["qwen3-qk-norm-tied"])).qk_norm


def test_load_arch_takes_a_directory_or_a_config_file(tmp_path):
    path = write_config(tmp_path, TINY_TEACHER)
    assert load_arch(tmp_path) == replace(load_arch(path), name=str(tmp_path))  # the name records the spec
    assert load_arch(path).total_params() == 3_443_136


def test_load_arch_errors_name_the_input(tmp_path):
    with pytest.raises(LawError, match=r"'llama2-7' is neither a preset \(.*llama2-7b.*\)"):
        load_arch("llama2-7")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{model_type: llama")
    with pytest.raises(LawError, match=rf"{bad_json}: not valid JSON"):
        load_arch(bad_json)
    no_type = write_config(tmp_path / "no_type", {"hidden_size": 64})
    with pytest.raises(LawError, match=rf"{no_type}: .*needs a 'model_type'"):
        load_arch(no_type)
    gpt2 = write_config(tmp_path / "gpt2", {"model_type": "gpt2"})
    with pytest.raises(LawError, match=rf"{gpt2}: model_type 'gpt2' is not supported; .*'llama'"):
        load_arch(gpt2)
    uneven = write_config(tmp_path / "uneven", {**TINY_TEACHER, "num_attention_heads": 5})
    with pytest.raises(LawError, match=rf"{uneven}: transformers rejects this llama config: .*heads"):
        load_arch(uneven)


def test_parse_count_reads_suffixes_exactly():
    assert parse_count("7B") == 7e9
    assert parse_count("350M") == parse_count("350m") == 3.5e8
    assert parse_count("125k") == 125e3
    assert parse_count("6_738_415_616") == 6738415616
    assert parse_count(" 6.7e9 ") == 6.7e9
    # the same size written two ways must be one number (fit_law groups runs by student size)
    assert all(parse_count(f"{i / 100}B") == float(f"{i / 100}e9") for i in range(1, 1000))
    for bad in ("seven", "", "B", "-3B", "0", "nan", "inf"):
        with pytest.raises(LawError, match="parameter count"):
            parse_count(bad)


# ---------------------------------------------------------------------------------------------------------------------
# The law and the students it derives


def test_law_forms_invert_each_other_and_a_flat_slope_is_refused():
    for teacher in (1e8, 6.738e9, 7e10):
        est = PUBLISHED_LAW.optimal_student(teacher)
        assert est.form == "affine"
        assert PUBLISHED_LAW.optimal_teacher(est.params).params == pytest.approx(teacher, rel=1e-12)
    flat = Law(1.0, 5.0, None, "flat", (1e8, 1e9))
    with pytest.raises(LawError, match="slope is 1 <= 1"):
        flat.optimal_student(1e9)


def test_llama2_7b_student_is_near_0_4x_and_the_table_holds_minima():
    teacher = load_arch("llama2-7b")
    est = PUBLISHED_LAW.optimal_student(teacher.total_params())
    assert est.form == "affine" and est.notes == ()
    assert est.params == pytest.approx((6738.415616 + 11.498) / 2.498 * 1e6)
    assert 0.39 < est.params / teacher.total_params() < 0.41

    candidates = student_candidates(teacher, est.params)
    top = candidates[0].arch
    assert abs(top.total_params() / est.params - 1) < 0.03
    assert top.head_dim == 128 and top.hidden_size % HIDDEN_MULTIPLE == 0 and top.intermediate_size % FFN_MULTIPLE == 0
    distances = [abs(math.log(c.arch.total_params() / est.params)) for c in candidates]
    assert distances == sorted(distances)

    minima = [c for c in candidates if (c.derivation, c.factor) == ("uniform", 0.75)]
    assert len(minima) == 1
    a = minima[0].arch
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.intermediate_size) == (24, 3072, 24, 24, 8192)


def test_tiny_teacher_uses_the_proportional_form_and_still_gets_students(tiny_teacher):
    est = PUBLISHED_LAW.optimal_student(tiny_teacher.total_params())
    assert est.form == "proportional"
    assert est.params == pytest.approx(tiny_teacher.total_params() / PUBLISHED_LAW.slope)
    assert any("proportional form" in n for n in est.notes)
    candidates = student_candidates(tiny_teacher, est.params)
    assert candidates
    for c in candidates:
        a = c.arch
        assert a.total_params() < tiny_teacher.total_params()
        assert a.num_heads * a.head_dim == a.hidden_size and a.head_dim == 32
        assert a.num_heads % a.num_kv_heads == 0
        assert_counts_match(a)


@pytest.mark.parametrize("name", [*preset_names(), "tiny"])
def test_candidates_are_smaller_and_consistent(name, tiny_teacher):
    teacher = tiny_teacher if name == "tiny" else load_arch(name)
    target = PUBLISHED_LAW.optimal_student(teacher.total_params()).params
    group = teacher.num_heads // teacher.num_kv_heads
    for c in student_candidates(teacher, target):
        a = c.arch
        assert a.total_params() < teacher.total_params()
        assert a.num_layers <= teacher.num_layers and a.hidden_size <= teacher.hidden_size
        assert a.intermediate_size <= teacher.intermediate_size
        assert a.num_heads * a.head_dim == a.hidden_size and a.head_dim == teacher.head_dim
        assert a.num_heads % a.num_kv_heads == 0
        assert (a.model_type, a.vocab_size) == (teacher.model_type, teacher.vocab_size)
        if name != "tiny":  # the presets' widths allow whole kv groups
            assert a.num_heads // a.num_kv_heads == group, a.shape()


def test_derivation_restricts_the_candidates():
    teacher = load_arch("llama2-7b")
    target = PUBLISHED_LAW.optimal_student(teacher.total_params()).params
    every = student_candidates(teacher, target)
    restricted = {d: student_candidates(teacher, target, d) for d in DERIVATIONS}
    for derivation, rows in restricted.items():
        assert rows and {c.derivation for c in rows} == {derivation}
    assert sorted(every, key=lambda c: c.arch.name) == sorted(
        [c for rows in restricted.values() for c in rows], key=lambda c: c.arch.name
    )
    assert (3072, 24) in {(c.arch.hidden_size, c.arch.num_layers) for c in restricted["uniform"]}
    with pytest.raises(LawError, match=r"derivation 'pruned' is not one of \['uniform', 'depth-only', 'width-only'\]"):
        student_candidates(teacher, target, "pruned")  # type: ignore[arg-type]


def test_written_student_config_loads_with_its_sizes(tmp_path):
    teacher = load_arch("qwen2.5-7b")
    student = student_candidates(teacher, 3e9, "uniform")[0].arch
    student.to_hf_config().save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "qwen2"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        student.num_layers,
        student.hidden_size,
        student.num_heads,
        student.num_kv_heads,
    )
    assert config.rope_parameters["rope_theta"] == 1e6  # inherited from the teacher
    assert hf_counts(config)[0] == student.total_params()


# ---------------------------------------------------------------------------------------------------------------------
# Teachers, chains, refitting, MiniDisc


def test_rank_teachers_prefers_the_law_and_warns_beyond_the_optimum():
    optimum, ranked = rank_teachers(3e9, [("70b", 70e9), ("llama2-7b", 6738415616.0), ("tiny", 1e9)])
    assert optimum.form == "affine" and optimum.params == pytest.approx(2.498 * 3e9 - 11.498e6)
    assert [t.name for t in ranked] == ["llama2-7b", "70b", "tiny"]
    assert ranked[0].warning is None
    assert "beyond the law's optimum" in ranked[1].warning and ranked[1].ratio_to_optimum > 9
    assert "not larger than the student" in ranked[2].warning


def test_assistant_chain_70b_to_3b_spaces_assistants_by_the_law():
    chain = assistant_chain(70e9, 3e9)
    assert len(chain.assistants) >= 1
    assert chain.sizes[0] == 70e9 and chain.sizes[-1] == 3e9
    assert all(a > b for a, b in zip(chain.sizes, chain.sizes[1:], strict=False))
    direct = abs(math.log(chain.direct_ratio))
    assert len(chain.step_ratios) == len(chain.sizes) - 1
    assert all(abs(math.log(r)) < direct for r in chain.step_ratios)
    assert all(abs(math.log(r)) < math.log(1.25) for r in chain.step_ratios)  # each step near the law


def test_assistant_chain_7b_to_2_7b_needs_none_and_bad_order_is_refused():
    chain = assistant_chain(6738415616.0, 2.7e9)
    assert chain.assistants == () and chain.sizes == (6738415616.0, 2.7e9)
    assert any("no assistant needed" in n for n in chain.notes)
    with pytest.raises(LawError, match="must be larger than the student"):
        assistant_chain(3e9, 7e9)


def known_line_runs(slope: float, intercept_m: float, metric: str) -> list[tuple[float, float, float]]:
    """Per student size, teachers around the line's teacher; the one on the line scores best (under ``metric``)."""
    runs = []
    for student in (1e8, 2.5e8, 6e8, 1.07e9, 2.01e9):
        best = (slope * student / 1e6 + intercept_m) * 1e6
        for factor in (0.4, 0.7, 1.0, 1.6, 3.0):
            distance = math.log(factor) ** 2
            runs.append((student, best * factor, -distance if metric == "score" else 2.0 + distance))
    return runs


@pytest.mark.parametrize("metric", ["score", "loss"])
def test_fit_recovers_a_known_line_from_a_csv(metric, tmp_path):
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student_params", "teacher_params", metric, "note"])
        for i, (s, t, v) in enumerate(known_line_runs(3.1, 42.0, metric)):
            # sizes in both notations: the same student size must group as one
            writer.writerow([f"{s / 1e9:g}B" if i % 2 else repr(s), repr(t), repr(v), "ignored"])
    fit = fit_law(read_results(path, metric), metric, source=str(path))
    assert len(fit.runs) == 25 and len(fit.best) == 5
    assert fit.law.slope == pytest.approx(3.1, rel=1e-9)
    assert fit.law.intercept_m == pytest.approx(42.0, rel=1e-6)
    assert fit.law.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.law.student_range == (1e8, 2.01e9)
    assert fit.notes == ()


def test_fit_notes_a_best_teacher_at_the_edge_and_needs_three_student_sizes():
    runs = known_line_runs(2.0, 10.0, "loss")
    edge = [(s, t, v) for s, t, v in runs if s != 1e8 or t < 2.05 * s]  # 100M: the on-line teacher is the largest
    assert any("largest tried" in n for n in fit_law(edge, "loss").notes)
    with pytest.raises(LawError, match=r"my-runs: .*at least 3 distinct student sizes \(found 2"):
        fit_law([r for r in runs if r[0] in (1e8, 2.01e9)], "loss", source="my-runs")


def test_malformed_results_csv_errors_name_file_line_and_column(tmp_path):
    missing = tmp_path / "missing.csv"
    missing.write_text("student_params,teacher,loss\n1e9,3e9,2.0\n")
    with pytest.raises(LawError, match=rf"{missing}, line 1: .*missing \['teacher_params'\]"):
        read_results(missing, "loss")
    with pytest.raises(LawError, match=r"missing \['teacher_params', 'score'\]"):
        read_results(missing, "score")
    bad_cell = tmp_path / "bad_cell.csv"
    bad_cell.write_text("student_params,teacher_params,loss\n1e9,3e9,2.0\n\n1e9,7e9,two\n")
    with pytest.raises(LawError, match=rf"{bad_cell}, line 4, column 'loss': 'two' is not a number"):
        read_results(bad_cell, "loss")
    bad_size = tmp_path / "bad_size.csv"
    bad_size.write_text("student_params,teacher_params,loss\n1e9,-3e9,2.0\n")
    with pytest.raises(LawError, match=rf"{bad_size}, line 2, column 'teacher_params': .*positive"):
        read_results(bad_size, "loss")
    with pytest.raises(LawError, match="no such file"):
        read_results(tmp_path / "absent.csv", "loss")
    with pytest.raises(LawError, match="metric must be 'score'"):
        read_results(bad_cell, "accuracy")  # type: ignore[arg-type]


ASSISTANTS = [("ta-80", 0.8, 0.70), ("ta-50", 0.5, 0.68), ("ta-30", 0.3, 0.60)]


def test_select_assistant_trades_score_for_size():
    ranked = select_assistant(ASSISTANTS, lam=0.2)
    for a in ranked:
        assert a.tradeoff == pytest.approx(a.score + 0.2 * (1 - a.scale))
    assert [a.tradeoff for a in ranked] == sorted((a.tradeoff for a in ranked), reverse=True)
    assert ranked[0].name == "ta-50"
    assert select_assistant(ASSISTANTS, lam=0.0)[0].name == "ta-80"  # the best score
    assert select_assistant(ASSISTANTS, lam=1.0)[0].name == "ta-30"  # a larger lambda: a smaller assistant
    for bad in (-0.1, math.nan):
        with pytest.raises(LawError, match="lambda must be a finite number >= 0"):
            select_assistant(ASSISTANTS, lam=bad)


def test_read_assistants_checks_the_scale(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("name,scale,score\n" + "".join(f"{n},{s},{v}\n" for n, s, v in ASSISTANTS))
    assert read_assistants(good) == ASSISTANTS
    for scale in ("1.5", "0", "-0.2"):
        bad = tmp_path / f"bad{scale}.csv"
        bad.write_text(f"name,scale,score\nta-80,0.8,0.7\nta-x,{scale},0.6\n")
        with pytest.raises(LawError, match=rf"{bad}, line 3, column 'scale': .* not in \(0, 1\]"):
            read_assistants(bad)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("name,scale,score\n")
    with pytest.raises(LawError, match="no assistant rows"):
        read_assistants(header_only)


# ---------------------------------------------------------------------------------------------------------------------
# The CLI


def test_cli_prints_the_table_for_llama2_7b():
    proc = run_cli("--teacher", "llama2-7b")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "total 6,738,415,616 parameters" in out
    assert "optimal student: 2.7B total parameters (0.401 x the teacher), affine form" in out
    assert any(line.split()[1:7] == ["24", "3072", "24", "24", "128", "8192"] for line in out.splitlines())
    assert "caveats:" in out


def test_cli_json_derivation_write_config_and_plot(tmp_path):
    config_dir, png = tmp_path / "student", tmp_path / "law.png"
    args = ["--teacher", "llama2-7b", "--derivation", "uniform", "--json", "--pick", "2"]
    proc = run_cli(*args, "--write-config", str(config_dir), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["teacher"]["total_params"] == 6738415616 and out["optimal_student"]["form"] == "affine"
    rows = out["candidates"]
    assert rows and all(r["derivation"].startswith("uniform ") for r in rows)
    row = rows[1]
    assert (row["layers"], row["hidden"], row["heads"], row["ffn"]) == (24, 3072, 24, 8192)  # MiniMA's shape
    assert out["written_config"]["row"] == 2

    config = AutoConfig.from_pretrained(config_dir)
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.vocab_size,
    ) == (row["layers"], row["hidden"], row["heads"], row["kv_heads"], row["ffn"], row["vocab"])
    assert hf_counts(config)[0] == row["total_params"]
    assert png.read_bytes()[:8] == PNG_SIGNATURE and out["plot"] == str(png)


def test_cli_bad_preset_exits_2_naming_it():
    proc = run_cli("--teacher", "llama2-7")
    assert proc.returncode == 2
    assert "'llama2-7' is neither a preset" in proc.stderr and "llama2-7b" in proc.stderr


def test_cli_in_process_errors_and_counts(tool, tmp_path, capsys):
    assert tool.main(["--teacher", "llama2-7b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["candidates"]
    assert len(rows) == 6 and {r["derivation"].split()[0] for r in rows} == set(DERIVATIONS)
    assert rows[0]["ratio_to_optimum"] == pytest.approx(1, abs=0.03)

    missing = tmp_path / "no_such_model"
    assert tool.main(["--teacher", str(missing)]) == 2
    assert f"{str(missing)!r} is neither a preset" in capsys.readouterr().err

    assert tool.main(["--teacher-params", "7B", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["teacher"]["total_params"] == 7e9 and "candidates" not in out
    assert out["optimal_student"]["total_params"] == pytest.approx((7000 + 11.498) / 2.498 * 1e6)

    assert tool.main(["--teacher-params", "seven"]) == 2
    assert "--teacher-params 'seven' is not a number" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--teacher-params", "7B", "--derivation", "uniform"])
    assert exit_info.value.code == 2
    assert "--derivation restricts the students derived from --teacher MODEL" in capsys.readouterr().err


def test_cli_in_process_teachers_chain_fit_and_assistants(tool, tmp_path, capsys):
    assert tool.main(["--student-params", "3e9", "--teachers", "llama2-7b,70e9", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)["teachers_ranked"]
    assert [t["name"] for t in ranked] == ["llama2-7b", "70e9"]
    assert ranked[0]["warning"] is None and "beyond the law's optimum" in ranked[1]["warning"]

    assert tool.main(["--teacher", "llama2-13b", "--student-params", "1B", "--derivation", "uniform", "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)["chain"]
    assert chain["assistants"] and all(a["shape"] and a["shape_params"] > 1e9 for a in chain["assistants"])

    runs = tmp_path / "runs.csv"
    runs.write_text(
        "student_params,teacher_params,score\n"
        + "".join(f"{s!r},{t!r},{v!r}\n" for s, t, v in known_line_runs(2.0, 100.0, "score"))
    )
    assert tool.main(["--fit", str(runs), "--teacher-params", "7B", "--json"]) == 0
    law = json.loads(capsys.readouterr().out)["law"]
    assert law["slope"] == pytest.approx(2.0) and law["intercept_millions"] == pytest.approx(100.0)

    assistants = tmp_path / "assistants.csv"
    assistants.write_text("name,scale,score\n" + "".join(f"{n},{s},{v}\n" for n, s, v in ASSISTANTS))
    assert tool.main(["--assistants", str(assistants), "--lambda", "1.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["assistants"]["chosen"] == "ta-30"
    assistants.write_text("name,scale,score\nta,2,0.5\n")
    assert tool.main(["--assistants", str(assistants)]) == 2
    assert f"{assistants}, line 2, column 'scale'" in capsys.readouterr().err
