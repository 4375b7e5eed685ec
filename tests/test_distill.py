"""The real DeepSpeed path on 2 CPU ranks (gloo): KD with sharded teacher and student, resume, export, gradients.

Every run uses ZeRO-3 JSONs with ``stage3_param_persistence_threshold: 0`` so that even tiny parameters are sharded
and gathered on use (at the default threshold, tiny models would keep every parameter whole).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from minima.config import ConfigError, load_config
from minima.dist import World
from minima.files import current_umask
from minima.shards import DataError
from tests.runs import BIN, MOE_STUDENT_ARCH, REPO, SEQ, STUDENT_ARCH, TEACHER_ARCH, launch, subprocess_env

TB_TAGS = {
    "train/loss",
    "train/ce_loss",
    "train/kd_loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_seen",
    "train/top1_agreement",
    "perf/tokens_per_s",
    "perf/peak_memory_gb",
    "val/loss",
    "val/ppl",
    "val/teacher_loss",
    "val/teacher_ppl",
}

pytestmark = pytest.mark.slow


def test_kd_run_logs_metrics_and_checkpoints(kd_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.loads((kd_run / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["tokens_seen"] == 6 * 512
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))  # exp of a loss in nats, not 2^loss
    assert metrics["teacher_val_loss"] is not None and metrics["teacher_params"] > metrics["student_params"] > 0
    acc = EventAccumulator(str(kd_run / "tensorboard")).Reload()
    assert set(acc.Tags()["scalars"]) >= TB_TAGS
    losses = [e.value for e in acc.Scalars("train/loss")]
    ce, kd = acc.Scalars("train/ce_loss")[0].value, acc.Scalars("train/kd_loss")[0].value
    assert acc.Scalars("train/loss")[0].value == pytest.approx(0.5 * ce + 0.5 * kd, rel=1e-5)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert len(acc.Scalars("val/loss")) == 2  # steps 3 and 6
    ckpts = sorted(p.name for p in (kd_run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]
    assert (kd_run / "checkpoints" / "latest").read_text() == "step_00000006"
    resolved = json.loads((kd_run / "config.json").read_text())
    assert resolved["derived"]["grad_accum_steps"] == 2 and resolved["derived"]["train_batch_size"] == 8
    assert resolved["student_ds_config"]["train_batch_size"] == 8
    assert "step 6" in (kd_run / "train.log").read_text()
    # The memory plan is printed and recorded at start; teacher.placement=auto takes the cheapest that fits.
    assert resolved["runtime"]["teacher_placement"] == "replicated"
    assert resolved["teacher_ds_config"]["zero_optimization"] == {"stage": 0}
    assert resolved["memory_plan"]["plans"]["replicated"]["fits"]
    assert resolved["student_ds_config"]["zero_optimization"]["stage"] == 3
    assert "memory plan per GPU" in (kd_run / "train.log").read_text()


def test_export_reloads_with_transformers_and_matches_reported_loss(kd_run, tiny_prepared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.evaluate import evaluate_model

    export = kd_run / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    # Readable by the group as the umask says, like the rest of the run directory (safetensors itself writes 0600).
    expected = 0o666 & ~current_umask()
    assert {p.name: p.stat().st_mode & 0o777 for p in export.iterdir()} == {p.name: expected for p in export.iterdir()}
    # fp32 training under ZeRO-3: the master weights are the weights.
    master = AutoModelForCausalLM.from_pretrained(kd_run / "export_fp32", dtype="auto").state_dict()
    assert all(torch.equal(t, master[k]) for k, t in AutoModelForCausalLM.from_pretrained(export).state_dict().items())
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.hidden_size == 32 and model.config.vocab_size == 1024
    tok = AutoTokenizer.from_pretrained(export)
    assert len(tok) == 1024 and tok.eos_token_id == model.config.eos_token_id
    # Ready to generate: pad and end-of-turn ids where generate() reads them, the trained context, a model card.
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id is not None
    assert model.generation_config.eos_token_id == tok.eos_token_id and tok.model_max_length == SEQ
    out = model.generate(**tok("def f(x):", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 1
    card = (export / "README.md").read_text()
    metrics = json.loads((kd_run / "metrics.json").read_text())
    assert "library_name: transformers" in card and f"{metrics['val_loss']:.4f}" in card and "forward_kl" in card
    assert f"{metrics['tokens_seen']:,} tokens" in card and "float32" in card
    # The reloaded model scores the same held-out windows as the run's final (distributed) evaluation.
    ours = evaluate_model(export, tiny_prepared_data, seq_len=SEQ, batch_size=2, max_windows=16)
    assert ours["loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)


def test_resume_continues_bit_identically(kd_run, kd_overrides, tmp_path):
    """Resume from the uninterrupted run's step-3 checkpoint (deepspeed launcher): steps 4-6 must be identical."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(kd_run / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    (out / "checkpoints" / "latest").write_text("step_00000003")
    launch([*kd_overrides, f"run.out_dir={out}"], launcher="deepspeed")
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "at step 3" in log
    a = (kd_run / "export" / "model.safetensors").read_bytes()
    b = (out / "export" / "model.safetensors").read_bytes()
    assert a == b, "resumed weights differ from the uninterrupted run"

    def step_losses(path):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(path / "tensorboard")).Reload()
        return {e.step: e.value for e in acc.Scalars("train/loss") if e.step > 3}

    assert step_losses(out) == step_losses(kd_run)


def tiny_moe_student(vocab: int = 40, hidden: int = 32, experts: int = 8, gate_std: float = 1.0):
    """A tiny MoE student as minima builds them (qwen2_moe, top-1, gate-probability scaling, the shared expert of
    width 1 at zero), its gate initialised wide so that routing is peaked and some experts get no tokens from a small
    batch."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen2_moe",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden,
        moe_intermediate_size=hidden,
        shared_expert_intermediate_size=1,
        num_experts=experts,
        num_experts_per_tok=1,
        norm_topk_prob=False,
        qkv_bias=False,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, gate_std)
            for p in (*layer.mlp.shared_expert.parameters(), layer.mlp.shared_expert_gate.weight):
                p.zero_()
    return model


@pytest.fixture(scope="module")
def grad_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny teacher/student HF directories (student head tied or untied, or an MoE student) and the DeepSpeed JSONs
    of the matrix."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = {}
    for kind in ("untied", "tied", "moe"):
        work = tmp_path_factory.mktemp(f"grad_{kind}")
        torch.manual_seed(0)
        for name, vocab, hidden, tie in (("teacher", 48, 48, False), ("student", 40, 32, kind == "tied")):
            cfg = LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=tie,
            )
            model = tiny_moe_student() if name == "student" and kind == "moe" else AutoModelForCausalLM.from_config(cfg)
            model.save_pretrained(work / name)
        for name in ("zero1", "zero2", "zero3", "zero3_offload", "zero3_teacher"):
            ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
            zero = ds["zero_optimization"]
            if zero["stage"] == 3:
                zero["stage3_param_persistence_threshold"] = 0  # every parameter really sharded and gathered
            # Small buckets: the head's gradient alone overflows one and is reduced the moment it arrives, so a
            # head whose gradient bypassed the engine's outputs would meet a stale accumulation boundary.
            zero["reduce_bucket_size"] = 1000
            if "allgather_bucket_size" in zero:
                zero["allgather_bucket_size"] = 1000
            (work / ("ds_teacher.json" if name == "zero3_teacher" else f"{name}.json")).write_text(json.dumps(ds))
        out[kind] = work
    return out


# (student JSON, accumulation steps, teacher placement, divergence, student, MixKD weight, MiniDisc sandwich): every
# shipped student configuration, both accumulation settings a recipe produces here, every teacher placement, an MoE
# student under ZeRO-3 (untied students under ZeRO-3 are covered by the offload row), MixKD micro-batches with tied
# embeddings (the embedding called by minima's forward, the head gathered around the loss) under ZeRO-3 and ZeRO-2,
# and a sandwich step over two candidate assistants under ZeRO-3.
GRAD_MATRIX = [
    ("zero3", 2, "zero3", "forward_kl", "tied", 0.5, True),
    ("zero3", 2, "node", "jsd", "moe", 0.0, False),
    ("zero3_offload", 4, "replicated", "forward_kl", "untied", 0.0, False),
    ("zero1", 2, "replicated", "forward_kl", "untied", 0.0, False),
    ("zero2", 4, "zero3", "jsd", "tied", 1.0, False),
]


@pytest.mark.parametrize(
    ("student_json", "accum", "placement", "divergence", "student", "mixup", "candidates"), GRAD_MATRIX
)
def test_gradients_equal_single_process_full_batch(
    grad_models, student_json, accum, placement, divergence, student, mixup, candidates
):
    """2 ranks x ``accum`` micro-batches with uneven padding, heads gathered for the chunked loss under ZeRO-3: the
    step's gradients (head included, tied or untied) equal those of a single process on the full batch with full
    logits and sum / N, whatever the student's ZeRO stage, CPU offload or the teacher's placement; the teacher's
    hidden states and the loss equal the reference's. An MoE student's gradient includes its per-sequence
    balancing loss, and experts that one rank never routes a token to (while the other does) neither hang ZeRO-3
    nor change the result. A MixKD micro-batch's step equals the reference with the mixed terms from full logits;
    MiniDisc's sandwich step equals the mean of the candidates' losses on the masked plain model."""
    work = grad_models[student]
    name = f"{student_json}_{accum}_{placement}_{divergence}"
    script = REPO / "tests" / "distributed" / "grad_equivalence.py"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), str(work)]
    cmd += [str(work / f"{student_json}.json"), "--accum", str(accum), "--placement", placement]
    cmd += ["--divergence", divergence, "--name", name, "--mixup", str(mixup)] + ["--candidates"] * candidates
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((work / f"{name}.json").read_text())
    assert result["sharded"], "parameters were not partitioned: the test would not exercise ZeRO-3"
    assert result["teacher"]["sharded"] == (placement != "replicated")
    assert result["teacher"]["node_shard"] == (placement == "node")
    assert result["teacher_hidden_max_abs_err"] < 1e-6, result
    assert result["loss_sum"] == pytest.approx(result["ref_loss_sum"], rel=1e-6)
    assert result["valid_tokens"] == pytest.approx(result["ref_valid_tokens"], rel=1e-12)
    assert result["max_rel_err"] < 1e-5, result
    assert result["grad_norm"] == pytest.approx(result["ref_grad_norm"], rel=1e-6)  # clipping sees the true norm
    assert result["per_micro_batch_mean_rel_err"] > 1e-2, "the batches are too uniform to catch mis-normalisation"
    assert result["shm_segments_left"] == [], "DeepSpeed's CPU all-reduce segments would outlive the run"
    if student == "moe":
        assert result["balance_sum"] > 0
        assert result["experts_idle_on_one_rank"] > 0, "every expert ran on both ranks: the test would not hang"


def test_single_process_run_without_launcher_on_a_mixture(tiny_prepared_data, tmp_path):
    """`python -m minima.distill` makes a world of one by itself; teacher=null is plain LM training; activation
    checkpointing recomputes the layers under the chunked loss; two sources mixed 3:1 with isolated documents, and the
    tokens of each logged. The student is an MoE with router jitter: its balancing loss and routing statistics reach
    TensorBoard, its switched-off shared expert stays exactly zero, and the export is a Qwen2-MoE that
    AutoModelForCausalLM loads and generates with."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    data = tmp_path / "mix"
    shutil.copytree(tiny_prepared_data / "tokenizer", data / "tokenizer")
    for name in ("web", "code"):
        for split in ("train", "valid"):
            shutil.copytree(tiny_prepared_data / split, data / name / split)
    out = tmp_path / "single"
    args = [
        f"data.dir={data}",
        "data.sources={web: 3, code: 1}",
        "data.documents=isolated",
        f"data.seq_len={SEQ}",
        f"student.arch={MOE_STUDENT_ARCH}",
        "optim.router_jitter=0.05",
        "teacher=null",
        "run.micro_batch_size=2",
        f"run.tokens_per_step={4 * SEQ}",
        "run.max_steps=2",
        "run.log_every=1",
        f"run.eval_tokens={8 * SEQ}",
        "run.activation_checkpointing=true",
        f"run.out_dir={out}",
    ]
    launch(args, launcher="python")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["teacher_val_loss"] is None and metrics["teacher_params"] == 0
    scalars = EventAccumulator(str(out / "tensorboard")).Reload()
    web, code = (scalars.Scalars(f"data/{name}/tokens")[-1].value for name in ("web", "code"))
    assert web + code == 2 * 4 * SEQ and web == 3 * code  # 8 windows, 6 from web and 2 from code
    tags = set(scalars.Tags()["scalars"])
    assert {"train/balance_loss", "moe/max_share", "moe/entropy", "moe/layer_1/load_expert_3"} <= tags
    loads = [scalars.Scalars(f"moe/layer_0/load_expert_{e}")[-1].value for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-6)
    assert 1.0 - 1e-6 <= scalars.Scalars("train/balance_loss")[-1].value <= 4.0
    assert metrics["student_active_params"] < metrics["student_params"]
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 4
    for layer in model.model.layers:
        assert all(float(p.detach().abs().sum()) == 0 for p in layer.mlp.shared_expert.parameters())
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    with pytest.raises(DataError, match=r"'wiki'.*sources in .*\['code', 'web'\].*--source wiki"):
        train_in_process([f"data.dir={data}", "data.sources={web: 1, wiki: 1}", f"run.out_dir={tmp_path / 'bad'}"])


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_runs_with_zero1_and_zero2_students(kd_overrides, tmp_path, stage):
    """The shipped ZeRO-1/2 JSONs in bf16 (DeepSpeed's BF16 optimizer at stage 1, fp32 gradient accumulation at both)
    train, checkpoint and export a loadable student under a real 2-rank run."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"zero{stage}"
    args = [*kd_overrides, f"run.out_dir={out}", "run.max_steps=2", "run.eval_every=0", "run.save_every=0"]
    launch([*args, f"run.ds_config=ds_configs/zero{stage}.json", "run.precision=bf16", "run.export_fp32=true"])
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["student_ds_config"]["zero_optimization"]["stage"] == stage
    assert resolved["student_ds_config"]["data_types"] == {"grad_accum_dtype": "fp32"}
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["val_loss"])
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    assert model.config.hidden_size == 32 and next(model.parameters()).dtype == torch.bfloat16
    # The fp32 master weights (zero_to_fp32) load as float32 and round to exactly the bf16 export.
    master = AutoModelForCausalLM.from_pretrained(out / "export_fp32", dtype="auto")
    assert next(master.parameters()).dtype == torch.float32
    bf16 = model.state_dict()
    for name, tensor in master.state_dict().items():
        assert torch.equal(tensor.to(torch.bfloat16), bf16[name]), name
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in master.state_dict().values())


# ----------------------------------------------------------------------------------------------------------------------
# Bad input fails before any model is built, with a message that names the problem.


def train_in_process(overrides: list[str]) -> None:
    from minima.distill import train

    cfg = load_config("tiny_cpu", overrides)
    train(cfg, World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


@pytest.fixture()
def corrupted_data(tiny_prepared_data, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(tiny_prepared_data, copy)
    return copy


def shard_file(split: Path, i: int) -> Path:
    return split / json.loads((split / "index.json").read_text())["shards"][i]["file"]


def test_missing_shard_is_a_clear_error(corrupted_data, tmp_path):
    shard = shard_file(corrupted_data / "train", 1)
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard.name}, listed in .* is missing"):
        train_in_process([f"data.dir={corrupted_data}", f"run.out_dir={tmp_path / 'run'}"])


def test_checksum_mismatch_is_a_clear_error(corrupted_data, tmp_path):
    shard = shard_file(corrupted_data / "train", 0)
    data = bytearray(shard.read_bytes())
    assert len(data) > 3 * 4096
    data[len(data) // 2] ^= 0xFF  # outside the first and last 4 KiB that every start compares
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{shard.name} does not match the sha256"):
        train_in_process([f"data.dir={corrupted_data}", "data.verify_checksums=true", f"run.out_dir={tmp_path / 'r'}"])
    data[1] ^= 0xFF  # inside them: found at every start, without data.verify_checksums
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{shard.name} is not the file .* lists"):
        train_in_process([f"data.dir={corrupted_data}", f"run.out_dir={tmp_path / 'r2'}"])


def test_sources_prepared_with_different_tokenizers_are_refused(tiny_prepared_data, tmp_path):
    data = tmp_path / "mix"
    shutil.copytree(tiny_prepared_data / "tokenizer", data / "tokenizer")
    for name in ("web", "code"):
        for split in ("train", "valid"):
            shutil.copytree(tiny_prepared_data / split, data / name / split)
    index_file = data / "code" / "train" / "index.json"
    index = json.loads(index_file.read_text())
    index["tokenizer"] = {**index["tokenizer"], "sha256": "f" * 64, "source": "/models/other"}
    index_file.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"code/train was tokenized with /models/other.*same tokenizer"):
        train_in_process([f"data.dir={data}", "data.sources={web: 1, code: 1}", f"run.out_dir={tmp_path / 'r'}"])


def test_teacher_vocab_smaller_than_tokenizer_is_refused(tiny_prepared_data, tmp_path):
    arch = "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4,"
    arch += " vocab_size: 1000}"
    with pytest.raises(ConfigError, match=r"teacher has vocab_size 1000 but the data's tokenizer .* has 1024"):
        train_in_process(
            [f"data.dir={tiny_prepared_data}", "teacher.path=null", f"teacher.arch={arch}", f"run.out_dir={tmp_path}"]
        )


def test_teacher_with_another_tokenizer_is_refused(tiny_prepared_data, tmp_path, stdlib_files):
    """Same size, different tokenizer: caught by comparing the teacher directory's tokenizer with the data's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minima.tokenizer import train_sentencepiece

    other = train_sentencepiece(stdlib_files[:3], tmp_path / "other_tok", vocab_size=1024)
    teacher = tmp_path / "teacher"
    cfg = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(teacher)
    for f in other.iterdir():
        shutil.copy(f, teacher / f.name)
    with pytest.raises(ConfigError, match=r"teacher tokenizer .* differs from the data's"):
        train_in_process([f"data.dir={tiny_prepared_data}", f"teacher.path={teacher}", f"run.out_dir={tmp_path}"])


def test_unknown_config_key_exits_with_message(capsys):
    """The entry point's status and message (the other tests launch it as a process: here it runs in this one)."""
    from minima.distill import main

    assert main(["tiny_cpu", "optim.learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.learning_rate'" in err and "'lr'" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_smoke_bf16(tiny_prepared_data, tmp_path):
    """The tiny recipe on one GPU: bf16 engines, flash-attn when installed; finite losses and a loadable export."""
    out = tmp_path / "gpu"
    args = [
        f"data.dir={tiny_prepared_data}",
        f"data.seq_len={SEQ}",
        f"student.arch={STUDENT_ARCH}",
        "teacher.path=null",
        f"teacher.arch={TEACHER_ARCH}",
        "run.precision=bf16",
        "run.micro_batch_size=4",
        f"run.tokens_per_step={4 * SEQ * 2}",
        "run.max_steps=10",
        f"run.out_dir={out}",
    ]
    launch(args, launcher="torchrun", nproc=1, gpu=True)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["runtime"]["dtype"] == "torch.bfloat16"
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["val_loss"])


def test_held_out_split_shorter_than_a_window_is_refused(tiny_prepared_data, tmp_path):
    from minima.shards import TokenShards

    valid_tokens = TokenShards.open(tiny_prepared_data / "valid").num_tokens
    assert valid_tokens + 1 < 16384  # the training shards still hold a window of this length
    with pytest.raises(DataError, match=r"valid holds .* less than one window"):
        train_in_process(
            [
                f"data.dir={tiny_prepared_data}",
                f"data.seq_len={valid_tokens}",
                "run.micro_batch_size=1",
                f"run.tokens_per_step={valid_tokens}",
                f"run.out_dir={tmp_path}",
            ]
        )
