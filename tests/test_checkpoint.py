"""Checkpoints you can trust: crash-safe saves, resume=auto that never picks an incomplete checkpoint, pruning that
reports failures, and resume on another number of ranks (DeepSpeed's universal checkpoints) that continues exactly.

The runs go through tests/distributed/checkpoint_run.py: minima.distill unchanged, recording the windows each rank
drew and the optimizer's whole state when a checkpoint is saved and when it is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from minima import checkpoint as ckpt
from minima.checkpoint import MINIMA_STATE, find_checkpoint, plan_resume, prune_checkpoints
from minima.config import ConfigError, load_config
from minima.dist import World
from tests.runs import BIN, REPO, STUDENT_ARCH, subprocess_env

SCRIPT = REPO / "tests" / "distributed" / "checkpoint_run.py"
STEPS = 6


@pytest.fixture()
def logged():
    """The 'minima' logger's records (it does not propagate to pytest's caplog once setup_logging has run)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("minima")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def fake_checkpoints(root: Path, complete: list[int], incomplete: list[int] = (), latest: str | None = None) -> Path:
    """<root>/checkpoints/step_* directories with (complete) or without minima's state, and a 'latest' pointer."""
    ckpts = root / "checkpoints"
    for step in [*complete, *incomplete]:
        d = ckpts / ckpt.checkpoint_tag(step)
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed")
        if step in complete:
            torch.save({"step": step}, d / MINIMA_STATE)
    if latest is not None:
        ckpts.mkdir(parents=True, exist_ok=True)
        (ckpts / "latest").write_text(latest)
    return ckpts


# ----------------------------------------------------------------------------------------------------------------------
# find_checkpoint and pruning (no DeepSpeed)


def test_auto_takes_latest_when_complete(tmp_path):
    ckpts = fake_checkpoints(tmp_path, complete=[2, 4, 6], latest="step_00000004")
    assert find_checkpoint(tmp_path, "auto") == ckpts / "step_00000004"  # 'latest' names the last save
    assert find_checkpoint(tmp_path, "never") is None
    assert find_checkpoint(tmp_path / "elsewhere", "auto") is None  # nothing saved yet: start afresh


@pytest.mark.parametrize(
    ("latest", "why"),
    [
        ("step_00000006", "no minima_state.pt"),  # a save interrupted after DeepSpeed's files
        ("\x00\x17garbage\n", "not a checkpoint name"),
        ("../../etc", "not a checkpoint name"),
        ("step_00000008", "does not exist"),
        (None, "no .*latest"),
    ],
)
def test_auto_falls_back_to_newest_complete(tmp_path, logged, latest, why):
    ckpts = fake_checkpoints(tmp_path, complete=[2, 4], incomplete=[6], latest=latest)
    assert find_checkpoint(tmp_path, "auto") == ckpts / "step_00000004"
    (message,) = [r.getMessage() for r in logged if r.levelno == logging.WARNING]
    assert __import__("re").search(why, message) and "newest complete checkpoint" in message
    assert str(ckpts / "step_00000004") in message


def test_auto_never_picks_a_checkpoint_without_minima_state(tmp_path, logged):
    fake_checkpoints(tmp_path, complete=[], incomplete=[2, 4], latest="step_00000004")
    assert find_checkpoint(tmp_path, "auto") is None
    assert "no complete checkpoint" in logged[-1].getMessage()


def test_explicit_incomplete_checkpoint_is_a_clear_error(tmp_path):
    ckpts = fake_checkpoints(tmp_path, complete=[2], incomplete=[4])
    assert find_checkpoint(tmp_path, str(ckpts / "step_00000002")) == ckpts / "step_00000002"
    with pytest.raises(ConfigError, match=r"step_00000004 has no minima_state.pt .* not a complete minima checkpoint"):
        find_checkpoint(tmp_path, str(ckpts / "step_00000004"))
    with pytest.raises(ConfigError, match=r"does not exist"):
        find_checkpoint(tmp_path, str(ckpts / "step_00000099"))


def test_pruning_keeps_the_newest_and_reports_failures(tmp_path, logged, monkeypatch):
    ckpts = fake_checkpoints(tmp_path, complete=[1, 2, 4, 5, 7], incomplete=[3, 8])
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name == "step_00000002":
            raise PermissionError(13, "Permission denied", str(path))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    failed = prune_checkpoints(ckpts, keep_last=2, newest=ckpts / "step_00000005")
    left = sorted(p.name for p in ckpts.iterdir())
    # 4 and 5 kept; 1, 3 (a crashed save) gone; 2 failed; 7 and 8 are newer than the save and left alone
    assert left == ["step_00000002", "step_00000004", "step_00000005", "step_00000007", "step_00000008"]
    assert failed == [ckpts / "step_00000002"]
    (warning,) = [r.getMessage() for r in logged if r.levelno == logging.WARNING]
    assert str(ckpts / "step_00000002") in warning and "Permission denied" in warning
    assert not ckpt.is_complete(ckpts / "step_00000002")  # marked incomplete before the failure: never resumed from


# ----------------------------------------------------------------------------------------------------------------------
# A resume that cannot work: a message before any model is built


def engine_layout(**changes) -> dict:
    from transformers import AutoConfig

    arch = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = AutoConfig.for_model("llama", num_key_value_heads=2, vocab_size=1024, **arch)
    layout = {
        "dp_world_size": 2,
        "zero_stage": 3,
        "bf16": False,
        "offload": False,
        "param_shapes": ckpt._param_shapes(config),
        "optimizer": {"param_groups": [], "steps": []},
    }
    return {**layout, **changes}, config


@pytest.mark.parametrize(
    ("saved", "ds_config", "message"),
    [
        ({"zero_stage": 1}, {}, r"saved under ZeRO stage 1 \(run.ds_config=ds_configs/zero1.json\), this run uses"),
        ({"param_shapes": {"lm_head.weight": [1024, 64]}}, {}, r"student of another shape \(\d+ tensors differ"),
        ({"bf16": True}, {}, r"saved with bf16 engines, this run uses fp32: resume with run.precision=bf16"),
        ({"offload": True}, {}, r"saved on 2 data-parallel ranks, this run has 1, and ZeRO-Offload is on"),
        ({}, {"offload_optimizer": {"device": "cpu"}}, r"ZeRO-Offload is on"),
    ],
)
def test_resume_that_cannot_work_is_a_config_error(tmp_path, saved, ds_config, message):
    layout, config = engine_layout()
    if "param_shapes" in saved:
        saved = {"param_shapes": {**layout["param_shapes"], **saved["param_shapes"]}}
    ckpts = fake_checkpoints(tmp_path, complete=[4], latest="step_00000004")
    state = {"step": 4, "config": {"run": {"ds_config": "ds_configs/zero1.json"}}, "engine": {**layout, **saved}}
    torch.save(state, ckpts / "step_00000004" / MINIMA_STATE)
    ds = {"zero_optimization": {"stage": 3, **ds_config}}
    with pytest.raises(ConfigError, match=message) as e:
        plan_resume(tmp_path, "auto", world_size=1, ds_config=ds, student_config=config, is_main=True)
    assert str(ckpts / "step_00000004") in str(e.value)
    # The same layout on the same world size resumes as saved; on another size through a universal checkpoint.
    state["engine"] = layout
    torch.save(state, ckpts / "step_00000004" / MINIMA_STATE)
    plan = plan_resume(tmp_path, "auto", world_size=2, ds_config={"zero_optimization": {"stage": 3}},
                       student_config=config, is_main=True)  # fmt: skip
    assert plan.path == ckpts / "step_00000004" and not plan.universal and plan.state["step"] == 4


def test_distill_refuses_an_incompatible_checkpoint_before_building_models(tiny_prepared_data, tmp_path, monkeypatch):
    """Through minima.distill.train: a checkpoint of another ZeRO stage fails with the message, no model built."""
    from minima import engine as ds
    from minima.distill import train

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the resume was checked")

    monkeypatch.setattr(ds, "load_model", no_model)
    out = tmp_path / "run"
    layout, _ = engine_layout(zero_stage=1, dp_world_size=1)
    ckpts = fake_checkpoints(out, complete=[4], latest="step_00000004")
    state = {"step": 4, "config": {"run": {"ds_config": "ds_configs/zero1.json"}}, "engine": layout}
    torch.save(state, ckpts / "step_00000004" / MINIMA_STATE)
    overrides = [f"data.dir={tiny_prepared_data}", f"student.arch={STUDENT_ARCH}", "teacher=null", f"run.out_dir={out}"]
    cfg = load_config("tiny_cpu", overrides)
    with pytest.raises(ConfigError, match=r"step_00000004 was saved under ZeRO stage 1 .* resume with run.ds_config="):
        train(cfg, World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


# ----------------------------------------------------------------------------------------------------------------------
# Real runs: 2 CPU ranks on gloo


def run(probe: Path, args: list[str], *, nproc: int, crash: str | None = None, background: bool = False):
    env = subprocess_env()
    if crash:
        env["CRASH"] = crash
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT), str(probe), "tiny_cpu"]
    cmd += args
    if background:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or crash, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses(out: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def windows_per_step(probe: Path, nproc: int, first_step: int) -> dict[int, Counter]:
    """The training windows each optimizer step consumed over all ranks (hashes of their tokens)."""
    per_rank = [json.loads((probe / f"windows_rank{r}.json").read_text()) for r in range(nproc)]
    rows_per_step = len(per_rank[0]) // (STEPS - first_step + 1)
    steps = {}
    for i in range(STEPS - first_step + 1):
        steps[first_step + i] = Counter(
            h for rows in per_rank for h in rows[i * rows_per_step : (i + 1) * rows_per_step]
        )
    return steps


def resume_copy(src: Path, step: int, out: Path) -> None:
    """A run directory holding only ``src``'s checkpoint of ``step`` (as a job requeued elsewhere would find it)."""
    tag = ckpt.checkpoint_tag(step)
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag)


@pytest.fixture(scope="module")
def zero3_ref(tmp_path_factory, kd_overrides) -> tuple[Path, Path, list[str]]:
    """One uninterrupted 2-rank run under ZeRO-3 (6 steps, a checkpoint each): (out_dir, probe dir, overrides)."""
    base = tmp_path_factory.mktemp("zero3_ref")
    args = [*kd_overrides, "run.save_every=1"]
    run(base / "probe", [*args, f"run.out_dir={base / 'out'}"], nproc=2)
    return base / "out", base / "probe", args


def assert_optimizer_equal(loaded: dict, saved: dict) -> None:
    """The resumed optimizer is the saved one: every parameter's fp32 master weight and Adam moments bit for bit, each
    param group's hyperparameters, each group's step counter, the lr schedule."""
    assert loaded["params"].keys() == saved["params"].keys()
    for name, tensors in saved["params"].items():
        for key, value in tensors.items():
            assert torch.equal(loaded["params"][name][key], value), f"{name} {key} differs"
    assert loaded["param_groups"] == saved["param_groups"]  # lr, weight_decay (0.1 and 0.0), betas, eps, ...
    assert dict(loaded["steps"]) == dict(saved["steps"])  # per group
    assert loaded["scheduler"] == saved["scheduler"]


def assert_continues(ref_out, ref_probe, out, probe, *, nproc, resumed_at, ref_nproc=2, saved_probe=None):
    """A resumed run consumed exactly the windows the uninterrupted run consumed after ``resumed_at``, its loss
    curve matches, and its optimizer right after loading equals the one saved (counters advancing by one each)."""
    log = (out / "train.log").read_text()
    assert f"at step {resumed_at}" in log and "universal checkpoint" in log, log[-2000:]
    ref_windows = windows_per_step(ref_probe, ref_nproc, 1)
    got_windows = windows_per_step(probe, nproc, resumed_at + 1)
    for step, windows in got_windows.items():
        assert windows == ref_windows[step], f"step {step} consumed other windows"
    saved = torch.load((saved_probe or ref_probe) / f"saved_step{resumed_at}.pt", weights_only=False)
    loaded = torch.load(probe / "loaded.pt", weights_only=False)
    assert_optimizer_equal(loaded, saved)
    after = torch.load(probe / "after_first_step.pt", weights_only=False)["steps"]
    assert [s for _, s in after] == [dict(saved["steps"])[g] + 1 for g, _ in after], "a step counter did not add 1"
    assert len(set(loaded["step_tensor_ids"])) == len(loaded["step_tensor_ids"]), "sub-groups share a step tensor"
    ref_losses, got = losses(ref_out), losses(out)
    assert sorted(got) == list(range(resumed_at + 1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=0), (step, got, ref_losses)
    final = torch.load(out / "checkpoints" / ckpt.checkpoint_tag(STEPS) / MINIMA_STATE, weights_only=True)
    ref_final = torch.load(ref_out / "checkpoints" / ckpt.checkpoint_tag(STEPS) / MINIMA_STATE, weights_only=True)
    assert final["loader"] == ref_final["loader"] and final["tokens_seen"] == ref_final["tokens_seen"]
    assert final["engine"]["dp_world_size"] == nproc


@pytest.mark.slow
def test_zero3_saved_on_2_ranks_resumed_on_1_and_back_on_2(zero3_ref, tmp_path):
    """2 -> 1 rank from step 2, then that run's step-4 checkpoint 1 -> 2 ranks: each continues as if never stopped."""
    ref_out, ref_probe, args = zero3_ref
    one, two = tmp_path / "one", tmp_path / "two"
    resume_copy(ref_out, 2, one / "out")
    run(one / "probe", [*args, f"run.out_dir={one / 'out'}"], nproc=1)
    assert (one / "out" / "checkpoints" / "step_00000002" / "universal" / "zero").is_dir()  # converted once, kept
    assert_continues(ref_out, ref_probe, one / "out", one / "probe", nproc=1, resumed_at=2)
    resume_copy(one / "out", 4, two / "out")
    run(two / "probe", [*args, f"run.out_dir={two / 'out'}"], nproc=2)
    assert_continues(ref_out, ref_probe, two / "out", two / "probe", nproc=2, resumed_at=4, saved_probe=one / "probe")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2])  # ZeRO-1 shares its optimizer code with ZeRO-2 (and passes: run with [1, 2])
def test_zero12_saved_on_2_ranks_resumed_on_1(kd_overrides, tmp_path, stage):
    ref, one = tmp_path / "ref", tmp_path / "one"
    args = [*kd_overrides, f"run.ds_config=ds_configs/zero{stage}.json", "run.save_every=3"]
    run(ref / "probe", [*args, f"run.out_dir={ref / 'out'}"], nproc=2)
    resume_copy(ref / "out", 3, one / "out")
    run(one / "probe", [*args, f"run.out_dir={one / 'out'}"], nproc=1)
    assert_continues(ref / "out", ref / "probe", one / "out", one / "probe", nproc=1, resumed_at=3)


# ----------------------------------------------------------------------------------------------------------------------
# kill -9


@pytest.mark.slow
def test_kill9_of_one_rank_then_resume_is_bit_identical(zero3_ref, tmp_path):
    """SIGKILL of one rank at a random file write of a checkpoint save (torn or not), then of one rank at a random
    moment of the resumed run: each time resume=auto continues from the last complete checkpoint, and the run ends
    bit for bit as the one that never stopped (weights and every step's loss)."""
    ref_out, _, args = zero3_ref
    seed = int(os.environ.get("MINIMA_CRASH_SEED", "0"))
    rng = random.Random(seed)
    out = tmp_path / "out"
    args = [*args, f"run.out_dir={out}"]
    # 1. Killed inside a save: rank, save (steps 2-4) and write (torch.save or os.replace) drawn at random.
    crash = f"{rng.randrange(2)}:{rng.randrange(2, 5)}:{rng.randrange(1, 6)}" + (":torn" if rng.random() < 0.5 else "")
    first = run(tmp_path / "probe1", args, nproc=2, crash=crash)
    assert first.returncode != 0 and "CRASH: rank" in first.stdout + first.stderr, (seed, crash, first.stderr[-3000:])
    picked = find_checkpoint(out, "auto")
    assert ckpt.is_complete(picked) and torch.load(picked / MINIMA_STATE, weights_only=True)["step"] >= 1
    # 2. The resumed run, killed from outside at a random moment: a step, a save or an evaluation.
    probe = tmp_path / "probe2"
    second = run(probe, args, nproc=2, background=True)
    log, deadline = out / "train.log", time.time() + 240
    while time.time() < deadline and not (log.is_file() and "resumed from" in log.read_text()):
        assert second.poll() is None, second.stdout.read()[-4000:]
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.2))
    with contextlib.suppress(ProcessLookupError):  # that rank had finished: the last resume starts after the end
        os.kill(int((probe / f"pid_rank{rng.randrange(2)}").read_text()), signal.SIGKILL)
    second.communicate(timeout=120)
    # 3. Once more, to the end.
    third = run(tmp_path / "probe3", args, nproc=2)
    resumed = [line for line in log.read_text().splitlines() if "resumed from" in line]
    assert len(resumed) >= 2, third.stdout[-3000:]
    step = int(resumed[-1].split("at step ")[1].split()[0])
    ref_model = (ref_out / "export" / "model.safetensors").read_bytes()
    assert (out / "export" / "model.safetensors").read_bytes() == ref_model, (seed, crash)
    ref_losses, got = losses(ref_out), losses(out)
    assert {s: got[s] for s in range(step + 1, STEPS + 1)} == {s: ref_losses[s] for s in range(step + 1, STEPS + 1)}
