"""Recipes load, overrides apply with types checked, bad input names the key, derived values are consistent."""

import json

import pytest

from minima.config import ConfigError, derive, load_config, load_ds_config, recipe_names


def test_builtin_recipes_load():
    assert {"tiny_cpu", "llama2_7b_to_3b"} <= set(recipe_names())
    cfg = load_config("tiny_cpu")
    assert cfg.kd.ce_weight == 0.5 and cfg.kd.kd_weight == 0.5 and cfg.kd.temperature == 1.0


def test_scale_recipe_is_the_minima_setting():
    cfg = load_config("llama2_7b_to_3b", ["teacher.path=/models/llama-2-7b", "data.dir=/data"])
    arch = cfg.student.arch
    assert (arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["num_attention_heads"]) == (
        3072,
        8192,
        24,
        24,
    )
    assert cfg.data.seq_len == 4096 and cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.1
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.grad_clip) == (0.9, 0.95, 1.0)
    assert cfg.run.precision == "bf16" and cfg.run.activation_checkpointing
    d = derive(cfg, world_size=64)
    assert d.tokens_per_step == 4194304 and d.train_batch_size == 1024
    assert d.warmup_steps == round(0.01 * d.total_steps)


def test_scale_recipe_requires_paths():
    with pytest.raises(ConfigError, match=r"teacher.path.*data.dir"):
        load_config("llama2_7b_to_3b")


def test_overrides_apply_with_types():
    cfg = load_config(
        "tiny_cpu",
        ["optim.lr=1e-3", "teacher=null", "student.arch.hidden_size=64", "run.max_steps=7", "run.resume=never"],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.teacher is None and cfg.student.arch["hidden_size"] == 64
    assert derive(cfg, 1).total_steps == 7  # max_steps takes precedence over total_tokens


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown key 'optim.lrr'.*valid keys.*'lr'"),
        ("bogus.x=1", r"unknown key 'bogus'.*valid keys"),
        ("optim.lr=fast", r"'optim.lr' must be a number"),
        ("run.precision=fp16", r"'run.precision' must be one of \['auto', 'bf16', 'fp32'\]"),
        ("run.micro_batch_size=2.5", r"whole number"),
        ("run.micro_batch_size=0", r"run.micro_batch_size must be > 0"),
        ("optim.beta2=1.5", r"optim.beta2 must be in"),
        ("kd.temperature=0", r"kd.temperature must be > 0"),
        ("student.path=/x", r"student: both 'path' and 'arch' are set.*student='\{path: DIR\}'"),
        ("student={}", r"student: a model needs 'path'.*or 'arch'"),
        ("run.activation_checkpointing=maybe", r"must be true or false"),
        ("optim.lr", r"not of the form key.sub=value"),
        ("teacher.placement=ddp", r"'teacher.placement' must be one of \['auto', 'replicated', 'node', 'zero3'\]"),
        # fewer held-out tokens than one window would silently evaluate the whole split
        ("run.eval_tokens=100", r"run.eval_tokens=100 is less than one window of data.seq_len=256"),
        ("data.sources={pile: 0}", r"data.sources.pile must be a positive weight"),
        ("data.sources={train: 1}", r"source named 'train'.*--source"),
        ("data.sources={a/b: 1}", r"source named 'a/b'"),
        ("data.sources={}", r"data.sources is empty"),
        ("data.documents=always", r"'data.documents' must be one of \['auto', 'off', 'bos', 'isolated'\]"),
        ("data.prefetch=-1", r"data.prefetch must be >= 0"),
    ],
)
def test_bad_input_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", [override])


def test_epochs_of_a_mixture_are_refused_with_what_to_give():
    with pytest.raises(ConfigError, match=r"run.epochs counts passes over one source.*run.total_tokens"):
        load_config("tiny_cpu", ["run.epochs=2", "data.sources={a: 1, b: 2}"])


def test_unknown_recipe_lists_choices():
    with pytest.raises(ConfigError, match=r"tiny_cpu"):
        load_config("no_such_recipe")


@pytest.mark.parametrize("world", [1, 2, 8])
def test_derived_batch_keys_are_consistent(world):
    cfg = load_config("tiny_cpu", ["run.tokens_per_step=65536", "run.micro_batch_size=4"])
    d = derive(cfg, world)
    keys = d.ds_batch_keys(4)
    assert (
        keys["train_batch_size"] == keys["train_micro_batch_size_per_gpu"] * keys["gradient_accumulation_steps"] * world
    )
    assert keys["train_batch_size"] * cfg.data.seq_len == 65536
    assert d.total_tokens >= cfg.run.total_tokens and d.total_tokens - cfg.run.total_tokens < 65536


def test_indivisible_tokens_per_step_suggests_values():
    cfg = load_config("tiny_cpu", ["run.tokens_per_step=10000"])
    with pytest.raises(ConfigError, match=r"use e.g. run.tokens_per_step=8192 or 10240"):
        derive(cfg, 1)


def test_ds_json_must_not_set_derived_keys(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"train_batch_size.*remove them"):
        load_ds_config(str(p), "run.ds_config")
    with pytest.raises(ConfigError, match=r"file not found"):
        load_ds_config(str(tmp_path / "missing.json"), "run.ds_config")


def test_shipped_ds_configs_hold_engine_settings_only():
    stages = {"zero1.json": 1, "zero2.json": 2, "zero3.json": 3, "zero3_teacher.json": 3, "zero3_offload.json": 3}
    for name, stage in stages.items():
        ds = load_ds_config(f"ds_configs/{name}", "run.ds_config")
        assert ds["zero_optimization"]["stage"] == stage
        # fp32 reduce-scatter would double the gradient traffic and be rounded to the engine dtype afterwards anyway
        assert "communication_data_type" not in ds
    teacher = load_ds_config("ds_configs/zero3_teacher.json", "run.teacher_ds_config")
    assert "optimizer" not in teacher and "scheduler" not in teacher


def test_resolved_config_round_trips():
    cfg = load_config("tiny_cpu", ["optim.lr=5e-4"])
    from minima.config import from_dict

    assert from_dict(cfg.to_dict()) == cfg
