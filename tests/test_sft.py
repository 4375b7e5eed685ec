"""The chat stage end to end: 2-rank CPU runs of minima.sft on conversations prepared from docstrings, with and without
KD from a teacher; early stopping and the best evaluation's export; the export's chat template."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from minima.chat import render
from minima.chat_data import prepare_chat
from minima.docstrings import docstring_conversations, write_jsonl
from minima.early_stop import EarlyStopping
from minima.evaluate import evaluate_model
from tests.runs import BIN, REPO, STUDENT_ARCH, TEACHER_ARCH, subprocess_env

pytestmark = pytest.mark.slow

CHAT_SEQ = 128
CHAT_STUDENT = STUDENT_ARCH.replace("max_position_embeddings: 64", f"max_position_embeddings: {CHAT_SEQ}")
CHAT_TEACHER = TEACHER_ARCH.replace("max_position_embeddings: 64", f"max_position_embeddings: {CHAT_SEQ}")


@pytest.fixture(scope="module")
def chat_records() -> list[dict]:
    return docstring_conversations(240, seed=0)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tiny_tokenizer_dir, chat_records):
    out = tmp_path_factory.mktemp("chat_data")
    source = write_jsonl(chat_records, out / "raw" / "chat.jsonl")
    prepare_chat([source], tiny_tokenizer_dir, out / "prepared", seq_len=CHAT_SEQ, valid_fraction=0.15, seed=0)
    return out / "prepared"


def sft(overrides: list[str], out, sharded_ds_configs) -> dict:
    """A 2-rank torchrun of minima.sft on the tiny chat recipe; its metrics.json."""
    student_ds, teacher_ds = sharded_ds_configs
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "minima.sft", "tiny_chat"]
    cmd += [f"run.out_dir={out}", f"student.arch={CHAT_STUDENT}", "student.path=null", f"data.seq_len={CHAT_SEQ}"]
    cmd += ["run.micro_batch_size=2", f"run.tokens_per_step={2 * 2 * CHAT_SEQ}", "run.log_every=1"]
    cmd += [f"run.ds_config={student_ds}", f"run.teacher_ds_config={teacher_ds}", *overrides]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "metrics.json").read_text())


def val_losses(out) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload().Scalars("val/loss")
    return {e.step: e.value for e in events}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, chat_data, sharded_ds_configs):
    """Plain SFT (no teacher) from a random init, with NEFTune noise: 12 steps, the dev loss every 4."""
    out = tmp_path_factory.mktemp("sft")
    overrides = [f"data.dir={chat_data}", "run.max_steps=12", "run.eval_every=4", "run.early_stopping_patience=0"]
    metrics = sft([*overrides, "optim.lr=3e-2", "optim.neftune_alpha=5"], out, sharded_ds_configs)
    return out, metrics


def test_sft_lowers_dev_loss(sft_run, chat_data):
    out, metrics = sft_run
    losses = val_losses(out)
    assert sorted(losses) == [4, 8, 12] and losses[12] < losses[4] < math.log(1024), losses  # from ~ln V at init
    assert losses[12] < math.log(1024) - 0.75
    exported = evaluate_model(out / "export", chat_data, seq_len=CHAT_SEQ)  # labelled tokens only, as in training
    assert exported["loss"] == pytest.approx(metrics["val_loss"], rel=1e-4)


def test_export_carries_the_template_and_generates(sft_run, chat_records, tiny_tokenizer_dir):
    out, _ = sft_run
    export = out / "export"
    tok = AutoTokenizer.from_pretrained(export)
    for record in chat_records[:20]:
        ids = tok.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert ids == render(record["messages"], AutoTokenizer.from_pretrained(tiny_tokenizer_dir))[0].tolist()
    assert tok.model_max_length == CHAT_SEQ
    card = (export / "README.md").read_text()
    assert "instruction tuning (MiniChat)" in card and "minichat chat template" in card
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.generation_config.eos_token_id == tok.eos_token_id and model.config.pad_token_id is not None
    messages = chat_records[0]["messages"][:-1]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    # Out of the box: the text-generation pipeline renders chat messages with the exported template.
    chat = pipeline("text-generation", model=str(export), device="cpu")
    reply = chat(messages, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert reply[:-1] == messages and reply[-1]["role"] == "assistant"


@pytest.fixture(scope="module")
def mismatched_chat_data(tmp_path_factory, tiny_tokenizer_dir, chat_records, chat_data):
    """Training conversations whose every reply is "Yes.", the dev split of ``chat_data``'s docstring answers: the
    more the model learns to say yes, the worse its dev loss, so early stopping has something to stop."""
    out = tmp_path_factory.mktemp("chat_yes")
    yes = [{"messages": [*r["messages"][:-1], {"role": "assistant", "content": "Yes."}]} for r in chat_records]
    yes = [r for r in yes if r["messages"][-2]["role"] == "user"]
    source = write_jsonl(yes, out / "raw" / "yes.jsonl")
    prepare_chat([source], tiny_tokenizer_dir, out / "yes", seq_len=CHAT_SEQ, valid_fraction=0.1, seed=0)
    mixed = out / "mixed"
    shutil.copytree(out / "yes" / "train", mixed / "train")
    shutil.copytree(out / "yes" / "tokenizer", mixed / "tokenizer")
    shutil.copytree(chat_data / "valid", mixed / "valid")
    return mixed


def test_early_stopping_exports_the_best_evaluation(tmp_path, mismatched_chat_data, sharded_ds_configs):
    overrides = [f"data.dir={mismatched_chat_data}", "run.max_steps=16", "run.eval_every=2", "optim.lr=3e-2"]
    metrics = sft([*overrides, "run.early_stopping_patience=1"], tmp_path, sharded_ds_configs)
    losses = val_losses(tmp_path)
    early = metrics["early_stopping"]
    assert early["stopped"] and metrics["step"] < 16, (losses, early)
    best_step = min(losses, key=losses.get)
    assert early["best_step"] == best_step < metrics["step"] and early["best_loss"] == pytest.approx(losses[best_step])
    # The export is the best evaluation's weights, not the last step's: its dev loss is the best one.
    exported = evaluate_model(tmp_path / "export", mismatched_chat_data, seq_len=CHAT_SEQ)
    assert exported["loss"] == pytest.approx(early["best_loss"], rel=1e-4) != pytest.approx(metrics["val_loss"])
    assert f"{early['best_loss']:.4f}" in (tmp_path / "export" / "README.md").read_text()
    assert "early stopping" in (tmp_path / "train.log").read_text()


def test_sft_with_kd_from_a_teacher(tmp_path, chat_data, sharded_ds_configs):
    """KD on the assistant positions (0.5 CE + 0.5 KD) from a ZeRO-3 teacher: the run finishes, logs the KD terms
    and lowers the dev loss."""
    overrides = [f"data.dir={chat_data}", "run.max_steps=6", "run.eval_every=3", "optim.lr=1e-2"]
    overrides += [f"teacher={{arch: {CHAT_TEACHER}, placement: zero3}}", "kd.ce_weight=0.5", "kd.kd_weight=0.5"]
    metrics = sft(overrides, tmp_path, sharded_ds_configs)
    losses = val_losses(tmp_path)
    assert losses[6] < losses[3] < math.log(1024) - 0.2, losses  # from ~ln V at init
    assert metrics["teacher_val_loss"] is not None
    log = (tmp_path / "train.log").read_text()
    assert "kd_loss" in log or "train/kd_loss" in json.dumps(metrics) or (tmp_path / "tensorboard").is_dir()


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    early = EarlyStopping(patience=2)
    assert early.update(10, 3.0) and not early.stopped
    assert not early.update(20, 3.0) and not early.stopped  # equal is no improvement
    assert early.update(30, 2.5) and early.evals_since_best == 0
    assert not early.update(40, 2.6) and not early.update(50, 2.7) and early.stopped
    assert (early.best_step, early.best_loss) == (30, 2.5)
    resumed = EarlyStopping(patience=2)
    resumed.load_state_dict(json.loads(json.dumps(early.state_dict())))
    assert resumed == early
    never = EarlyStopping(patience=0)
    for step in range(5):
        never.update(step, 1.0 + step)
    assert not never.stopped


def test_sft_entry_point_dry_run_of_the_shipped_recipe(tmp_path) -> None:
    """minichat_3b resolves with MiniChat's settings (its paths given; the data is not read in a dry run of a missing
    directory, so this checks the error names it)."""
    cmd = [sys.executable, "-m", "minima.sft", "minichat_3b", f"student.path={tmp_path}", f"data.dir={tmp_path}/none"]
    proc = subprocess.run([*cmd, "--dry-run"], env=subprocess_env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and f"{tmp_path}/none/train" in proc.stderr, proc.stderr[-2000:]
