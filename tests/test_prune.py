"""Student initialisation by structured pruning (minima.prune, tools/prune_to_student.py) on tiny teachers.

Every student weight must be a slice of a teacher weight: the tests rebuild each expected slice from the kept indices
in ``pruning.json`` (independently of the slicing code) and compare bit for bit. Importance, layer selection and the
GQA rule are checked on teachers edited so that the right answer is known; a tiny teacher trained here on the
prepared data shows that the pruned initialisation is worth having; a 2-rank ZeRO-3 run must agree with one process.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

from minima.data import TokenWindowLoader, eval_batches
from minima.importance import Shape, accumulate_importance, calibration_batches
from minima.prune import PruneError, prune_to_student, select_layers
from minima.shards import IGNORE_INDEX, DataError, TokenShards
from tests.runs import BIN, REPO, subprocess_env, tool_main

VOCAB = 1024  # the tiny tokenizer's
CALIB = {"seq_len": 32, "calib_windows": 8, "batch_size": 4, "device": "cpu"}  # 256 calibration tokens


def cli_main(argv: list[str]) -> int:
    """``tools/prune_to_student.py``'s ``main`` in-process (a subprocess costs seconds of imports)."""
    return tool_main("prune_to_student")(argv)


def save_teacher(path: Path, config, *, seed: int = 0, edit: Callable | None = None, dtype=torch.float32) -> Path:
    """A randomly initialised (seeded) teacher written with ``save_pretrained``; ``edit(model)`` may change weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and two threads fighting other work for 2 cores run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama(**fields) -> LlamaConfig:
    base = {"vocab_size": VOCAB, "max_position_embeddings": 128, "tie_word_embeddings": False}
    return LlamaConfig(**{**base, **fields})


# 8 query heads in 2 groups of 4 (head_dim 8); tied embeddings, as in small LLaMA-family models.
GQA = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8}
GQA |= {"num_key_value_heads": 2, "tie_word_embeddings": True}
MHA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4}


@pytest.fixture(scope="module")
def gqa_teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("gqa") / "teacher", llama(**GQA))


@pytest.fixture(scope="module")
def mha_teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("mha") / "teacher", llama(**MHA))


@pytest.fixture(scope="module")
def qwen2_teacher(tmp_path_factory) -> Path:
    """q/k/v projections with biases; 8 heads over 4 kv heads."""
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return save_teacher(tmp_path_factory.mktemp("qwen2") / "teacher", cfg)


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Rows of a q/k/v projection (columns of o_proj) that belong to ``heads``."""
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def assert_sliced_from_teacher(teacher_dir: Path, student_dir: Path) -> list[list[int]]:
    """Every student tensor equals the teacher tensor cut to the kept indices of ``pruning.json``; returns the kept
    FFN neurons of each student layer (``pruning.json`` records their number: they are found among the teacher's
    gate_proj rows, and up_proj / down_proj must then be cut to the very same neurons)."""
    kept = json.loads((student_dir / "pruning.json").read_text())["kept"]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    t, s = teacher.state_dict(), student.state_dict()
    head_dim = Shape.of(teacher.config).head_dim  # qwen2 configs may leave it implicit
    hidden = torch.tensor(kept["hidden"], dtype=torch.long)
    expected = {
        "model.embed_tokens.weight": t["model.embed_tokens.weight"][:, hidden],
        "model.norm.weight": t["model.norm.weight"][hidden],
        "lm_head.weight": t["lm_head.weight"][:, hidden],
    }
    all_neurons = []
    for i, layer in enumerate(kept["layers"]):
        src, dst = f"model.layers.{layer}.", f"model.layers.{i}."
        gate = t[src + "mlp.gate_proj.weight"][:, hidden]
        neurons = []
        for row in s[dst + "mlp.gate_proj.weight"]:
            matches = (gate == row).all(dim=1).nonzero().flatten().tolist()
            assert len(matches) == 1, f"student layer {i} has a gate_proj row that is no row of teacher layer {layer}"
            neurons.append(matches[0])
        assert neurons == sorted(neurons) and len(set(neurons)) == kept["neurons_per_layer"][i] == len(neurons)
        all_neurons.append(neurons)
        n = torch.tensor(neurons, dtype=torch.long)
        q, kv = head_rows(kept["heads"][i], head_dim), head_rows(kept["kv_heads"][i], head_dim)
        rules = {  # module -> (rows, columns) of the teacher's weight; a bias follows the rows
            "self_attn.q_proj": (q, hidden),
            "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, q),
            "mlp.gate_proj": (n, hidden),
            "mlp.up_proj": (n, hidden),
            "mlp.down_proj": (hidden, n),
        }
        for module, (rows, cols) in rules.items():
            expected[f"{dst}{module}.weight"] = t[f"{src}{module}.weight"][rows][:, cols]
            if f"{src}{module}.bias" in t:
                expected[f"{dst}{module}.bias"] = t[f"{src}{module}.bias"][rows]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected[f"{dst}{norm}.weight"] = t[f"{src}{norm}.weight"][hidden]
    assert set(s) == set(expected)
    for name, tensor in expected.items():
        assert s[name].shape == tensor.shape and torch.equal(s[name], tensor), name
    return all_neurons


def assert_shape(student_dir: Path, target: Shape, model_type: str) -> None:
    cfg = AutoModelForCausalLM.from_pretrained(student_dir).config
    assert cfg.model_type == model_type
    got = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert (*got, cfg.intermediate_size) == (target.layers, target.hidden, target.heads, target.kv_heads, target.ffn)


# ----------------------------------------------------------------------------------------------------------------------
# The teacher's own shape gives back the teacher; smaller shapes are slices of it.


@pytest.fixture(scope="module")
def bf16_teacher(tmp_path_factory) -> Path:
    """Stored in bf16: computing in fp32 and writing in the stored dtype must still give back the same weights."""
    return save_teacher(tmp_path_factory.mktemp("bf16") / "teacher", llama(**MHA), dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["gqa_teacher", "qwen2_teacher", "bf16_teacher"])
def test_own_shape_reproduces_the_teacher_exactly(name, request, tiny_prepared_data, tmp_path):
    teacher_dir = request.getfixturevalue(name)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    shape = Shape.of(teacher.config)
    summary = prune_to_student(teacher_dir, shape, tiny_prepared_data / "train", tmp_path / "student", **CALIB)
    assert summary["kept"]["layers"] == list(range(shape.layers))
    assert summary["kept"]["hidden"] == list(range(shape.hidden))
    assert all(heads == list(range(shape.heads)) for heads in summary["kept"]["heads"])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.dtype == teacher.dtype
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_smaller_llama_from_a_target_config_through_the_cli(mha_teacher, tiny_prepared_data, tmp_path, capsys):
    """--target config.json (only its sizes are read): fewer layers (4 -> 3, the odd extra dropped at the output
    end), hidden, heads and FFN neurons; the checkpoint loads and every weight is a slice of the teacher's."""
    target = tmp_path / "target" / "config.json"
    target.parent.mkdir()
    sizes = {"num_hidden_layers": 3, "hidden_size": 24, "num_attention_heads": 3, "intermediate_size": 40}
    target.write_text(json.dumps({"model_type": "llama", "head_dim": 8, "vocab_size": 7, **sizes}))
    out = tmp_path / "student"
    argv = ["--teacher", str(mha_teacher), "--target", str(target.parent), "--calib", str(tiny_prepared_data / "train")]
    argv += ["--out", str(out), "--seq-len", "32", "--calib-windows", "8", "--batch-size", "4", "--device", "cpu"]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    # 8 windows of 32 labels, less the first label of each window that starts mid-document (BOS put there instead)
    assert printed["layers"] == [0, 1, 2] and 8 * 31 <= printed["calibration"]["tokens"] <= 8 * 32
    assert_shape(out, Shape(3, 24, 3, 3, 40), "llama")
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == VOCAB  # the teacher's, not the target's
    neurons = assert_sliced_from_teacher(mha_teacher, out)
    assert [len(n) for n in neurons] == [40, 40, 40]


def test_gqa_fewer_kv_heads_at_the_teacher_ratio_keeps_whole_groups(gqa_teacher, tiny_prepared_data, tmp_path):
    """8 heads / 2 kv -> 4 heads / 1 kv: each layer keeps one whole group, the one of larger summed importance."""
    target = Shape(layers=2, hidden=48, heads=4, kv_heads=1, ffn=32)
    summary = prune_to_student(gqa_teacher, target, tiny_prepared_data / "train", tmp_path / "s", **CALIB)
    assert_shape(tmp_path / "s", target, "llama")
    assert_sliced_from_teacher(gqa_teacher, tmp_path / "s")
    kept, importance = summary["kept"], summary["importance"]["heads"]
    for layer, heads, (kv,) in zip(kept["layers"], kept["heads"], kept["kv_heads"], strict=True):
        assert heads == [4 * kv + i for i in range(4)]
        group_sums = [sum(importance[layer][4 * g : 4 * g + 4]) for g in range(2)]
        assert group_sums[kv] >= group_sums[1 - kv]


def test_gqa_all_kv_heads_with_fewer_query_heads_per_group(gqa_teacher, tiny_prepared_data, tmp_path):
    """8 heads / 2 kv -> 4 heads / 2 kv: both kv heads stay, each group keeps its 2 most important query heads."""
    target = Shape(layers=4, hidden=40, heads=4, kv_heads=2, ffn=48)
    summary = prune_to_student(gqa_teacher, target, tiny_prepared_data / "train", tmp_path / "s", **CALIB)
    assert_shape(tmp_path / "s", target, "llama")
    assert_sliced_from_teacher(gqa_teacher, tmp_path / "s")
    kept, importance = summary["kept"], summary["importance"]["heads"]
    assert kept["kv_heads"] == [[0, 1]] * 4
    for layer, heads in zip(kept["layers"], kept["heads"], strict=True):
        for g in range(2):
            group = list(range(4 * g, 4 * g + 4))
            ranked = sorted(group, key=lambda h, row=importance[layer]: -row[h])
            assert [h for h in heads if h in group] == sorted(ranked[:2])


def test_qwen2_biases_are_sliced_with_their_heads(qwen2_teacher, tiny_prepared_data, tmp_path):
    target = Shape(layers=2, hidden=40, heads=4, kv_heads=2, ffn=32)
    prune_to_student(qwen2_teacher, target, tiny_prepared_data / "train", tmp_path / "s", **CALIB)
    assert_shape(tmp_path / "s", target, "qwen2")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert student.model.layers[0].self_attn.q_proj.bias.shape == (4 * 8,)
    assert len(student.config.layer_types) == 2
    assert_sliced_from_teacher(qwen2_teacher, tmp_path / "s")  # includes q/k/v biases cut to the kept heads


# ----------------------------------------------------------------------------------------------------------------------
# Importance is the mask gradient; layers are chosen by the documented rules.


def importance_of(teacher_dir: Path, data: Path):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval().requires_grad_(False)
    shape = Shape.of(model.config)
    batches = calibration_batches(TokenShards.open(data / "train"), seq_len=32, num_windows=8, batch_size=4)
    return accumulate_importance(model, iter(batches), shape, torch.device("cpu"), show_progress=False)


def test_a_unit_without_effect_has_zero_importance_and_is_dropped_first(gqa_teacher, tiny_prepared_data, tmp_path):
    """Silence the most important unit of each kind: layer 1's head (its o_proj columns), layer 0's FFN neuron (its
    down_proj column) and a hidden dimension (its embedding column and every o_proj / down_proj row, so the residual
    stream is 0 there). Their mask gradients become exactly 0, all others stay > 0, and they are dropped first."""
    before = importance_of(gqa_teacher, tiny_prepared_data)
    assert (before.heads > 0).all() and (before.neurons > 0).all() and (before.hidden > 0).all()
    head, neuron, dim = int(before.heads[1].argmax()), int(before.neurons[0].argmax()), int(before.hidden.argmax())

    def silence(model):
        model.model.layers[1].self_attn.o_proj.weight[:, head * 8 : (head + 1) * 8] = 0
        model.model.layers[0].mlp.down_proj.weight[:, neuron] = 0
        model.model.embed_tokens.weight[:, dim] = 0  # tied: the output head's column too
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dim] = 0
            layer.mlp.down_proj.weight[dim] = 0

    edited = save_teacher(tmp_path / "edited", llama(**GQA), edit=silence)
    after = importance_of(edited, tiny_prepared_data)
    assert after.heads[1, head] == 0 and after.neurons[0, neuron] == 0 and after.hidden[dim] == 0
    nonzero = [int(x.count_nonzero()) for x in (after.heads, after.neurons, after.hidden)]
    assert nonzero == [4 * 8 - 1, 4 * 64 - 1, 64 - 1]

    # One query head fewer per group and one neuron fewer per layer: the silenced head leaves its group, the silenced
    # neuron its layer (hidden 48: LlamaConfig wants hidden_size divisible by the 6 heads).
    target = Shape(layers=4, hidden=48, heads=6, kv_heads=2, ffn=63)
    summary = prune_to_student(edited, target, tiny_prepared_data / "train", tmp_path / "s", **CALIB)
    assert summary["importance"]["heads"][1][head] == 0 and dim not in summary["kept"]["hidden"]
    group = range(head // 4 * 4, head // 4 * 4 + 4)
    assert [h for h in summary["kept"]["heads"][1] if h in group] == [h for h in group if h != head]
    neurons = assert_sliced_from_teacher(edited, tmp_path / "s")
    assert neurons[0] == [n for n in range(64) if n != neuron]


@pytest.mark.parametrize(
    ("teacher_layers", "keep", "expected"),
    [
        (6, 4, [1, 2, 3, 4]),  # even difference: one from each end
        (6, 3, [1, 2, 3]),  # odd: the extra one from the output end
        (7, 4, [1, 2, 3, 4]),
        (4, 3, [0, 1, 2]),
        (4, 1, [1]),
        (4, 4, [0, 1, 2, 3]),
    ],
)
def test_symmetric_selection_keeps_the_middle_layers(teacher_layers, keep, expected):
    assert select_layers(teacher_layers, keep, "symmetric") == expected


def test_importance_selection_drops_a_layer_that_is_an_identity(tiny_prepared_data, tmp_path):
    """Layer 2 with zero o_proj and down_proj passes the residual stream through unchanged: block influence 0, so
    ``importance`` drops it, while ``symmetric`` (4 -> 3 keeps [0, 1, 2]) would keep it."""

    def identity(model):
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()

    teacher = save_teacher(tmp_path / "teacher", llama(**MHA), edit=identity)
    target = Shape(layers=3, hidden=32, heads=4, kv_heads=4, ffn=64)
    summary = prune_to_student(
        teacher, target, tiny_prepared_data / "train", tmp_path / "s", layer_selection="importance", **CALIB
    )
    influence = summary["importance"]["layer_influence"]
    assert abs(influence[2]) < 1e-6 and min(influence[:2] + influence[3:]) > 1e-3, influence
    assert summary["kept"]["layers"] == [0, 1, 3]
    assert_sliced_from_teacher(teacher, tmp_path / "s")  # student layer 2 is teacher layer 3
    symmetric = prune_to_student(teacher, target, tiny_prepared_data / "train", tmp_path / "sym", **CALIB)
    assert symmetric["kept"]["layers"] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------------------
# A trained teacher: the pruned initialisation against a random one and a few steps of training from scratch.

SEQ, MICRO, LR = 64, 8, 3e-3
# "A few steps": a quarter of the teacher's training, with the teacher's recipe, for a scratch and a pruned student.
TEACHER_STEPS, FEW_STEPS = 200, 50


def train(model: torch.nn.Module, split: Path, steps: int, seed: int) -> torch.nn.Module:
    """Plain next-token training: AdamW at LR, MICRO windows of SEQ tokens per step."""
    torch.manual_seed(seed)
    loader = TokenWindowLoader(split, seq_len=SEQ, micro_batch_size=MICRO, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = next(loader)
        logits = model(input_ids=batch.input_ids).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, data: Path) -> float:
    """Mean next-token cross-entropy (nats) over every SEQ-token window of the valid split."""
    ce_sum, num_tokens = 0.0, 0
    for batch in eval_batches(TokenShards.open(data / "valid"), seq_len=SEQ, micro_batch_size=32):
        valid = batch.labels != IGNORE_INDEX
        logits = model.eval()(input_ids=batch.input_ids).logits  # (B, T, V)
        ce_sum += F.cross_entropy(logits[valid], batch.labels[valid], reduction="sum").item()
        num_tokens += int(valid.sum())
    return ce_sum / num_tokens


def unigram_loss(data: Path) -> float:
    """Held-out cross-entropy (nats) of the training split's add-one unigram distribution."""
    train_ids = np.concatenate([np.asarray(s) for s in TokenShards.open(data / "train").shards]).astype(np.int64)
    valid_ids = np.concatenate([np.asarray(s) for s in TokenShards.open(data / "valid").shards]).astype(np.int64)
    counts = np.bincount(train_ids, minlength=VOCAB) + 1.0
    return float(-np.log(counts[valid_ids] / counts.sum()).mean())


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, tiny_prepared_data) -> tuple[Path, float]:
    """A 4-layer LLaMA (hidden 64, FFN 128, 4 heads) trained TEACHER_STEPS steps on the train split (where its
    held-out loss stops improving on this little data), saved with the data's tokenizer; and its held-out loss."""
    cfg = llama(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
    torch.manual_seed(0)
    model = train(AutoModelForCausalLM.from_config(cfg), tiny_prepared_data / "train", TEACHER_STEPS, seed=0)
    path = tmp_path_factory.mktemp("trained") / "teacher"
    model.save_pretrained(path)
    for f in (tiny_prepared_data / "tokenizer").iterdir():
        shutil.copy(f, path / f.name)
    return path, held_out_loss(model, tiny_prepared_data)


def test_pruned_trained_teacher_beats_random_and_scratch_init(trained_teacher, tiny_prepared_data, tmp_path):
    """Held-out loss: the pruned student before any training is far below a random init of its shape and below that
    init after FEW_STEPS steps; given the same FEW_STEPS steps, the pruned init stays ahead."""
    teacher_dir, teacher_loss = trained_teacher
    unigram = unigram_loss(tiny_prepared_data)
    assert teacher_loss < unigram - 0.5, f"the teacher learned too little: {teacher_loss:.3f} vs unigram {unigram:.3f}"

    target = Shape(layers=3, hidden=48, heads=3, kv_heads=3, ffn=96)
    out = tmp_path / "pruned"
    prune_to_student(
        teacher_dir, target, tiny_prepared_data / "train", out, seq_len=SEQ, calib_windows=32, batch_size=16
    )
    assert len(AutoTokenizer.from_pretrained(out)) == VOCAB  # the teacher's tokenizer files came along
    pruned = AutoModelForCausalLM.from_pretrained(out)
    torch.manual_seed(1)
    random_loss = held_out_loss(AutoModelForCausalLM.from_config(pruned.config), tiny_prepared_data)
    pruned_loss = held_out_loss(pruned, tiny_prepared_data)
    torch.manual_seed(1)
    scratch = train(AutoModelForCausalLM.from_config(pruned.config), tiny_prepared_data / "train", FEW_STEPS, seed=1)
    scratch_loss = held_out_loss(scratch, tiny_prepared_data)
    pruned_trained_loss = held_out_loss(
        train(pruned, tiny_prepared_data / "train", FEW_STEPS, seed=1), tiny_prepared_data
    )
    report = (
        f"held-out loss (nats): teacher {teacher_loss:.3f}, unigram {unigram:.3f}, random init {random_loss:.3f},"
        f" pruned {pruned_loss:.3f}, scratch after {FEW_STEPS} AdamW steps {scratch_loss:.3f},"
        f" pruned after {FEW_STEPS} steps {pruned_trained_loss:.3f}"
    )
    print(report)
    assert math.isclose(random_loss, math.log(VOCAB), abs_tol=0.1), report
    assert pruned_loss < random_loss - 1.0, report
    assert pruned_loss < scratch_loss, report
    assert pruned_trained_loss < scratch_loss, report


# ----------------------------------------------------------------------------------------------------------------------
# ZeRO-3 on 2 CPU ranks agrees with one process.


@pytest.mark.slow
def test_zero3_two_ranks_equal_single_process(gqa_teacher, tiny_prepared_data, tmp_path):
    """Teacher sharded with persistence threshold 0 (tiny parameters really partitioned), importance selection (the
    block-influence sums cross ranks too), 3 calibration batches over 2 ranks (one rank adds a padding batch)."""
    ds = json.loads((REPO / "ds_configs" / "zero3_teacher.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    sizes = {"layers": 3, "hidden": 48, "heads": 4, "kv_heads": 1, "ffn": 32}
    options = {"seq_len": 32, "calib_windows": 12, "batch_size": 4, "layer_selection": "importance"}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**sizes, **options}.items()]
    args += [
        f"--teacher={gqa_teacher}",
        f"--calib={tiny_prepared_data / 'train'}",
        f"--ds-config={tmp_path / 'ds.json'}",
    ]
    env = subprocess_env()
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "tools/prune_to_student.py", "--zero3"]
    proc = subprocess.run(
        [*cmd, *args, f"--out={tmp_path / 'zero3'}"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count('"student_shape"') == 1  # only rank 0 reports

    single = prune_to_student(
        gqa_teacher, Shape(**sizes), tiny_prepared_data / "train", tmp_path / "single", device="cpu", **options
    )
    sharded = json.loads((tmp_path / "zero3" / "pruning.json").read_text())
    runtime = sharded["runtime"]
    assert runtime["zero3"] and runtime["world_size"] == 2 and runtime["partitioned_params"] > 0, runtime
    assert sharded["kept"] == single["kept"]
    assert sharded["calibration"]["tokens"] == single["calibration"]["tokens"] >= 12 * 31
    for key in ("heads", "layer_influence"):
        np.testing.assert_allclose(sharded["importance"][key], single["importance"][key], rtol=1e-4, atol=2e-6)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the value, from the library and as exit status 2 from the command line.


@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory) -> Path:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    return save_teacher(tmp_path_factory.mktemp("gpt2") / "teacher", cfg)


GQA_SIZES = {"layers": 4, "hidden": 64, "heads": 8, "kv_heads": 2, "ffn": 64}
BAD_INPUT = {  # name -> (teacher fixture, size overrides or a target config.json, calib windows, error, message)
    "larger_than_teacher": ("gqa_teacher", {"layers": 5}, 8, PruneError, r"num_hidden_layers=5 is not in \[1, 4\]"),
    "head_dim_mismatch": (
        "gqa_teacher",
        {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 32,
            "head_dim": 16,
        },
        8,
        PruneError,
        r"head_dim=16 differs from the teacher's 8",
    ),
    "heads_not_multiple_of_kv": (
        "gqa_teacher",
        {"heads": 3, "kv_heads": 2},
        8,
        PruneError,
        r"num_attention_heads=3 is not a multiple of num_key_value_heads=2",
    ),
    "more_heads_per_kv_than_groups": (
        "gqa_teacher",
        {"heads": 8, "kv_heads": 1},
        8,
        PruneError,
        r"8 query heads per kv head .* groups hold 4: .* use num_key_value_heads >= 2",
    ),
    "sizes_transformers_refuses": (
        "gqa_teacher",
        {"hidden": 60},
        8,
        PruneError,
        r"hidden_size=60.*not a multiple of the number of attention heads \(8\)",
    ),
    "target_lacks_sizes": (
        "gqa_teacher",
        {"num_hidden_layers": 2, "hidden_size": 64},
        8,
        PruneError,
        r"config.json lacks \['num_attention_heads', 'intermediate_size'\]",
    ),
    "not_llama_family": ("gpt2_teacher", {}, 8, PruneError, r"model_type 'gpt2'"),
    "too_few_calibration_windows": (
        "gqa_teacher",
        {},
        100_000,
        DataError,
        r"fewer than the 100000 calibration windows",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_error(case, request, tiny_prepared_data, tmp_path, capsys):
    fixture, override, windows, error, message = BAD_INPUT[case]
    teacher = request.getfixturevalue(fixture)
    if "num_hidden_layers" in override:  # a target config.json
        (tmp_path / "config.json").write_text(json.dumps(override))
        target, target_args = tmp_path / "config.json", ["--target", str(tmp_path / "config.json")]
    else:
        target = Shape(**{**GQA_SIZES, **override})
        target_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(target).items() if k != "head_dim"]
    out = tmp_path / "student"
    # Teacher and target are checked before any data is read: a missing split must not be what they report.
    split = tiny_prepared_data / "train" if error is DataError else tmp_path / "no_such_split"
    with pytest.raises(error, match=message):
        prune_to_student(teacher, target, split, out, **{**CALIB, "calib_windows": windows})
    capsys.readouterr()  # drop what the call above printed (progress bars, warnings)
    argv = [f"--teacher={teacher}", *target_args, f"--calib={split}", f"--out={out}"]
    assert cli_main([*argv, "--seq-len=32", f"--calib-windows={windows}", "--device=cpu"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.splitlines()[-1].startswith("prune_to_student: error: "), stderr
    assert re.search(message, stderr), stderr
    assert not out.exists()


def test_calibration_windows_longer_than_the_teacher_context_are_refused(gqa_teacher, tiny_prepared_data, tmp_path):
    with pytest.raises(PruneError, match=r"--seq-len 129 exceeds the teacher's max_position_embeddings 128"):
        prune_to_student(gqa_teacher, Shape(**GQA_SIZES), tiny_prepared_data / "train", tmp_path / "s", seq_len=129)
    assert not (tmp_path / "s").exists()


def test_cli_refuses_target_and_sizes_together(gqa_teacher, tiny_prepared_data, tmp_path, capsys):
    argv = ["--teacher", str(gqa_teacher), "--target", str(gqa_teacher), "--layers", "2"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--calib", str(tiny_prepared_data / "train"), "--out", str(tmp_path / "s")])
    assert exit_info.value.code == 2
    assert "give --target or the sizes, not both" in capsys.readouterr().err


def test_out_dir_is_replaced_only_if_it_holds_a_pruned_checkpoint(mha_teacher, tiny_prepared_data, tmp_path):
    target = Shape(layers=2, hidden=32, heads=2, kv_heads=2, ffn=32)
    out = tmp_path / "student"
    prune_to_student(mha_teacher, target, tiny_prepared_data / "train", out, **CALIB)
    prune_to_student(mha_teacher, target, tiny_prepared_data / "train", out, **{**CALIB, "seed": 1})  # replaced
    assert json.loads((out / "pruning.json").read_text())["calibration"]["seed"] == 1
    assert not out.with_name("student.tmp").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(PruneError, match=rf"output {re.escape(str(other))} exists and is not a pruned checkpoint"):
        prune_to_student(mha_teacher, target, tiny_prepared_data / "train", other, **CALIB)
    assert (other / "notes.txt").read_text() == "keep me"
