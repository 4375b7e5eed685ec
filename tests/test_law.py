"""The law of capacity gap (``minima.law``) and its CLI: the law's two forms, teacher ranking, assistant chains,
refitting and MiniDisc's selection, and ``tools/pick_student_size.py`` end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minima.arch import DERIVATIONS
from minima.law import (
    PUBLISHED_LAW,
    Law,
    LawError,
    assistant_chain,
    fit_law,
    rank_teachers,
    read_assistants,
    read_results,
    select_assistant,
)
from minima.moe import SHARED_EXPERT_OFF

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "pick_student_size.py"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
# The law


def test_law_forms_invert_each_other_and_a_flat_slope_is_refused():
    for teacher in (1e8, 6.738e9, 7e10):
        est = PUBLISHED_LAW.optimal_student(teacher)
        assert est.form == "affine"
        assert PUBLISHED_LAW.optimal_teacher(est.params).params == pytest.approx(teacher, rel=1e-12)
    flat = Law(1.0, 5.0, None, "flat", (1e8, 1e9))
    with pytest.raises(LawError, match="slope is 1 <= 1"):
        flat.optimal_student(1e9)


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
    assert "applied to active parameters: the parameters a token goes through" in out  # the default, and why
    assert "optimal student: 2.7B active parameters (0.401 x the teacher), affine form" in out
    assert any(line.split()[1:7] == ["24", "3072", "24", "24", "128", "8192"] for line in out.splitlines())
    assert "caveats:" in out


def test_cli_json_derivation_write_config_and_plot(tool, tmp_path, capsys):
    config_dir, png = tmp_path / "student", tmp_path / "law.png"
    args = ["--teacher", "llama2-7b", "--derivation", "uniform", "--json", "--pick", "2"]
    assert tool.main([*args, "--write-config", str(config_dir), "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
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
    with torch.device("meta"):  # the written config's model, counted without memory
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == row["total_params"]
    assert png.read_bytes()[:8] == PNG_SIGNATURE and out["plot"] == str(png)


def test_cli_bad_preset_exits_2_naming_it(tool, capsys):
    assert tool.main(["--teacher", "llama2-7"]) == 2
    err = capsys.readouterr().err
    assert "'llama2-7' is neither a preset" in err and "llama2-7b" in err


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
    assert out["teacher"]["params"] == out["teacher"]["active_params"] == 7e9 and "candidates" not in out
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


# A tiny MoE teacher: 4 layers, 4 experts of FFN 128, top-1 (minima's MoE shape).
TINY_MOE_TEACHER = {
    "model_type": "qwen2_moe",
    "hidden_size": 128,
    "intermediate_size": 128,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 1,
    "num_experts": 4,
    "num_experts_per_tok": 1,
    "norm_topk_prob": False,
    "qkv_bias": False,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "tie_word_embeddings": False,
}


def test_cli_moe_students_of_llama2_7b_meet_the_optimum_in_active_params(tool, tmp_path, capsys):
    assert tool.main(["--teacher", "llama2-7b", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)["candidates"][0]
    config_dir = tmp_path / "student_moe"
    assert tool.main(["--teacher", "llama2-7b", "--moe", "4", "--json", "--write-config", str(config_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"]["used"] == "active"
    target = out["optimal_student"]["params"]
    row = out["candidates"][0]
    assert (row["experts"], row["experts_per_token"], row["moe_layers"]) == (4, 1, row["layers"])
    assert row["active_params"] == pytest.approx(dense["active_params"], rel=0.03)  # near the dense proposal
    assert row["active_params"] == pytest.approx(target, rel=0.03) and row["ratio_to_optimum"] == pytest.approx(
        row["active_params"] / target
    )
    assert row["total_params"] > 2.5 * row["active_params"]  # the experts hold ~E x the FFN

    config = AutoConfig.from_pretrained(config_dir)
    assert config.model_type == "qwen2_moe"
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 1, row["ffn"])
    assert (config.norm_topk_prob, config.qkv_bias, config.use_sliding_window) == (False, False, False)
    assert (config.shared_expert_intermediate_size, config.decoder_sparse_step, config.mlp_only_layers) == (
        SHARED_EXPERT_OFF,
        1,
        [],
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == row["total_params"]
    h, m, layers = row["hidden"], row["ffn"], row["layers"]
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * m, h) and experts.down_proj.shape == (4, h, m)
    per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // 4
    assert row["active_params"] == row["total_params"] - layers * (4 - 1) * per_expert  # top-1: 3 experts skipped


def test_cli_count_total_and_active_differ_for_an_moe_teacher(tool, tmp_path, capsys):
    path = tmp_path / "moe_teacher" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_MOE_TEACHER))
    outs = {}
    for count in ("active", "total"):
        assert tool.main(["--teacher", str(path), "--count", count, "--json"]) == 0
        outs[count] = json.loads(capsys.readouterr().out)
    teacher = outs["total"]["teacher"]
    assert teacher["active_params"] < teacher["total_params"]
    h, m = TINY_MOE_TEACHER["hidden_size"], TINY_MOE_TEACHER["moe_intermediate_size"]
    assert teacher["total_params"] - teacher["active_params"] == 4 * 3 * 3 * h * m  # 3 unused experts a layer
    for count, out in outs.items():
        assert out["count"]["used"] == count and out["teacher"]["params"] == teacher[f"{count}_params"]
        est = out["optimal_student"]
        assert est["params"] == pytest.approx(PUBLISHED_LAW.optimal_student(teacher[f"{count}_params"]).params)
        assert "total_params" not in est or count == "total"  # an MoE: S* is in one count only
        for row in out["candidates"]:  # the teacher's students keep its experts, sized in the count asked for
            assert row["experts"] == 4 and row["ratio_to_optimum"] == pytest.approx(
                row[f"{count}_params"] / est["params"]
            )
    assert outs["active"]["optimal_student"]["params"] < outs["total"]["optimal_student"]["params"]

    assert tool.main(["--teacher", str(path), "--moe", "4"]) == 2
    assert "already an MoE (4 experts): its students keep its experts; drop --moe" in capsys.readouterr().err
    for argv, message in (
        (["--teacher", "llama2-7b", "--moe-top-k", "2"], "--moe-top-k sets the experts per token of --moe E"),
        (["--teacher-params", "7B", "--moe", "4"], "--moe turns the students derived from --teacher MODEL into MoEs"),
    ):
        with pytest.raises(SystemExit):
            tool.main(argv)
        assert message in capsys.readouterr().err


def test_assistant_ties_go_to_the_larger_assistant():
    """As in minima.candidates.tradeoff_select (and MiniDisc's code): equal tradeoffs, up to float rounding, rank the
    larger assistant first."""
    ranked = select_assistant([("small", 0.5, 0.6), ("large", 0.7, 0.64), ("worse", 0.9, 0.4)], lam=0.2)
    assert [a.name for a in ranked] == ["large", "small", "worse"]  # 0.6 + 0.1 == 0.64 + 0.06 (not in floats)
