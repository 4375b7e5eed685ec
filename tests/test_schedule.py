"""MiniDisc's schedule (minima.schedule, tools/schedule_assistant.py): the rounds' arithmetic and a whole round."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from minima.candidates import shape_at
from minima.dist import World
from minima.importance import Shape
from minima.law import read_assistants, select_assistant
from minima.schedule import Options, ScheduleError, relative, round_sparsities, schedule, student_sparsity
from minima.shards import TokenShards
from tests.runs import BIN, REPO, subprocess_env

TEACHER = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
STUDENT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}


def llama_config(data: Path, sizes: dict) -> LlamaConfig:
    shards = TokenShards.open(data / "train")
    return LlamaConfig(
        vocab_size=shards.vocab_size,
        bos_token_id=shards.bos_id,
        eos_token_id=shards.eos_id,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **sizes,
    )


def test_round_arithmetic():
    assert round_sparsities((0.5, 0.6, 0.7, 0.8), teacher=0.0, student=0.65) == [0.5, 0.6, 0.65]
    assert round_sparsities((0.5, 0.6, 0.7, 0.8), teacher=0.5, student=0.75) == [0.6, 0.7, 0.75]
    assert round_sparsities((0.5, 0.6), teacher=0.6, student=0.6 + 1e-12) == [0.6 + 1e-12]  # only the student
    # a sparsity of the original teacher, on an assistant at 0.5: 0.75 of the teacher is half of the assistant
    assert relative(0.75, 0.5) == pytest.approx(0.5)
    assert relative(0.3, 0.0) == pytest.approx(0.3)
    teacher, ta = Shape(2, 64, 8, 8, 128, 8), shape_at(Shape(2, 64, 8, 8, 128, 8), 0.5)
    via_ta, direct = shape_at(ta, relative(0.75, 0.5)), shape_at(teacher, 0.75)  # nearly one candidate either way
    assert (via_ta.heads, via_ta.ffn) == (direct.heads, direct.ffn)
    assert abs(via_ta.hidden - direct.hidden) <= via_ta.heads  # hidden sizes round to a multiple of the heads


def test_student_sparsity_counts_parameters_without_embeddings(tmp_path):
    for name, sizes in (("teacher", TEACHER), ("student", STUDENT)):
        (tmp_path / name).mkdir()
        LlamaConfig(vocab_size=100, **sizes).save_pretrained(tmp_path / name)
    non_embedding = {
        n: 2 * (4 * s["hidden_size"] ** 2 + 3 * s["hidden_size"] * s["intermediate_size"] + 2 * s["hidden_size"])
        + s["hidden_size"]
        for n, s in (("teacher", TEACHER), ("student", STUDENT))
    }
    expected = 1 - non_embedding["student"] / non_embedding["teacher"]
    assert student_sparsity(tmp_path / "teacher", tmp_path / "student") == pytest.approx(expected)
    with pytest.raises(ScheduleError, match="between a larger teacher and a smaller student"):
        student_sparsity(tmp_path / "student", tmp_path / "teacher")


@pytest.mark.slow
def test_a_round_trains_scores_chooses_and_slices(tiny_prepared_data, tmp_path):
    """A whole round of tools/schedule_assistant.py in one process: the sandwich run of the distill stage, scores,
    the choice by the tradeoff (the table agrees with a hand computation), the chosen assistant as a Hugging Face
    model, the CSV for pick_student_size, and a second run that finds the round done."""
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(llama_config(tiny_prepared_data, TEACHER)).save_pretrained(teacher)
    student = tmp_path / "student"
    llama_config(tiny_prepared_data, STUDENT).save_pretrained(student)
    out = tmp_path / "out"
    overrides = [f"data.dir={tiny_prepared_data}", "data.seq_len=64", "run.micro_batch_size=2"]
    overrides += [
        "run.tokens_per_step=128",
        "run.max_steps=2",
        "run.eval_tokens=128",
        "run.ds_config=ds_configs/zero2.json",
    ]
    cmd = [str(BIN / "python"), str(REPO / "tools" / "schedule_assistant.py"), "tiny_cpu", *overrides]
    cmd += ["--teacher", str(teacher), "--student", str(student), "--out", str(out), "--lam", "0.05"]
    cmd += ["--sparsities", "0.25,0.4", "--calib-windows", "4", "--dev-windows", "8"]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "<- chosen" in proc.stderr  # the table is printed
    result = json.loads((out / "schedule.json").read_text())
    (record,) = result["rounds"]
    s_student = student_sparsity(teacher, student)
    assert [r["sparsity"] for r in record["table"]] == pytest.approx([0.25, 0.4, s_student])
    values = [r["score"] + 0.05 * r["sparsity"] for r in record["table"]]
    assert [r["value"] for r in record["table"]] == pytest.approx(values)
    assert record["chosen"] == pytest.approx(record["table"][values.index(max(values))]["sparsity"])
    assert all(0 <= r["score"] <= 1 and r["tokens"] > 0 and math.isfinite(r["ce"]) for r in record["table"])
    round_dir = out / "round1"
    if record["chosen"] < s_student - 1e-9:
        assistant = AutoModelForCausalLM.from_pretrained(record["assistant"])
        assert Shape.of(assistant.config) == shape_at(
            Shape.of(llama_config(tiny_prepared_data, TEACHER)), record["chosen"]
        )
        assert result["student_teacher"] == record["assistant"]
    else:
        assert record["assistant"] is None and not (round_dir / "assistant").exists()
    ranked = select_assistant(read_assistants(round_dir / "assistants.csv"), lam=0.05)
    assert len(ranked) == 3
    # Run again (in this process: a finished round builds nothing): the round is read back, not run again.
    done = (round_dir / "round.json").stat().st_mtime_ns
    again = Options(recipe="tiny_cpu", overrides=tuple(overrides), teacher=teacher, student=str(student), out_dir=out)
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert schedule(again, world)["rounds"][0] == json.loads((round_dir / "round.json").read_text())
    assert (round_dir / "round.json").stat().st_mtime_ns == done
