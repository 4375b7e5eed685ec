"""Token-level distillation of a frozen teacher (replicated, node-sharded or ZeRO-3: ``teacher.placement``) into a
ZeRO-1/2/3 student (plain LM training with teacher=null).

    deepspeed --num_gpus 8 -m minima.distill llama2_7b_to_3b teacher.path=/models/Llama-2-7b-hf data.dir=/data/mix
    torchrun --nproc_per_node 8 -m minima.distill RECIPE [key=value ...]
    python -m minima.distill tiny_cpu [key=value ...]           # a world of one
    python -m minima.distill RECIPE [key=value ...] --dry-run   # print the resolved config and derived values

The chat stage (``python -m minima.sft``, MiniChat) is this job on conversations prepared by tools/prepare_chat.py:
their shards label only the assistant replies and restart the position ids at each packed conversation
(``Batch.position_ids``); ``run.epochs`` and ``run.early_stopping_patience`` (the best evaluation is the export)
are its usual settings.

At start: the inputs are checked, the memory plan printed (it places the teacher under ``auto``), both engines built.
The step, top to bottom: draw the step's micro-batches; count their valid tokens over all ranks; for each micro-batch,
teacher forward under no_grad, student forward, loss sums, backward scaled once by the global count, engine step;
then log, evaluate, checkpoint. At the end: evaluation, a final checkpoint and the Hugging Face export. Two methods
are batch fields of that step: MixKD (``kd.mixup.*``: ``Batch.mix``, mixed copies of a micro-batch, ``minima.mixup``)
and MiniDisc's sandwich (``Batch.candidate``: each micro-batch once per candidate assistant, ``minima.candidates``,
driven by ``tools/schedule_assistant.py``).

Stopping early (pre-emption, time limits): SIGUSR1, SIGTERM, SIGINT or SIGHUP on any rank, or a file named STOP in
run.out_dir, make the job finish the optimizer step it is in, skip a due evaluation, save a checkpoint with the data
position, write <out_dir>/stopped.json and exit with status 75 (EXIT_REQUEUE); run again, it resumes by itself
(run.resume=auto). A second SIGINT aborts at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from minima.arch import ArchError, arch_from_hf_config
from minima.candidates import CandidateMasks, attach_candidates, sandwich
from minima.card import model_card
from minima.checkpoint import load_checkpoint, plan_resume, resume_ds_config, save_checkpoint
from minima.config import Config, ConfigError, KDConfig, derive, load_config, load_ds_config, recipe_names
from minima.data import Batch, Source, TokenWindowLoader, check_packing, count_windows, eval_batches
from minima.dist import World, all_reduce_max, all_reduce_sum, init_world, shutdown
from minima.early_stop import EarlyStopping
from minima.files import tree_bytes, write_atomic
from minima.losses import kd_loss_from_hidden, row_tokens
from minima.memory import choose as choose_placement
from minima.memory import format_choice, job_for
from minima.mixup import draw_mixes, mixed_targets
from minima.models import (
    add_neftune,
    check_head_path,
    check_vocab,
    choose_attn_implementation,
    count_params,
    hf_config,
    output_head,
)
from minima.moe import add_router_jitter, routing_scalars
from minima.monitor import Monitor, device_memory_bytes, peak_flops, peak_memory_gb, setup_logging
from minima.shards import DataError, TokenShards

# torch.distributed deprecations raised from inside DeepSpeed on every collective: not actionable here.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

EXIT_REQUEUE = 75  # stopped on request with a checkpoint saved: run the same command again to continue (EX_TEMPFAIL)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minima.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help=f"a recipe YAML path or one of {recipe_names()}")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3 teacher=null")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and stop")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_intermixed_args(argv)  # flags may come after the overrides
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"minima: config error: {e}", file=sys.stderr)
        return 2
    world = init_world()
    try:
        result = train(cfg, world, dry_run=args.dry_run)
    except (ConfigError, DataError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        where = f" (rank {world.rank})" if world.world_size > 1 else ""
        print(f"minima: {type(e).__name__}{where}: {e}", file=sys.stderr)
        # No barrier here: other ranks may be inside another collective; the launcher stops them when we exit.
        return 2
    shutdown()
    return EXIT_REQUEUE if "stopped_at_step" in result else 0


def train(cfg: Config, world: World, *, dry_run: bool = False, candidates: CandidateMasks | None = None) -> dict:
    """Run (or resume) one training job; returns the final metrics written to <out_dir>/metrics.json, or
    ``{"stopped_at_step": step, ...}`` when a stop was requested (signal or STOP file) and a checkpoint saved.

    ``candidates`` (MiniDisc, ``tools/schedule_assistant.py``): the student is the teacher's shape and every
    micro-batch runs once per candidate assistant (a sandwich step: the loss is the mean of the candidates' losses,
    through the one normalisation by the step's valid tokens, each candidate's counted once); the export holds the
    shared weights, from which ``minima.candidates`` scores and slices the candidates."""
    with _StopFlag(Path(cfg.run.out_dir) / STOP_FILE, world.is_main) as stop:  # caught from the first moment
        return _train(cfg, world, stop, dry_run=dry_run, candidates=candidates)


def _train(cfg: Config, world: World, stop: _StopFlag, *, dry_run: bool, candidates: CandidateMasks | None) -> dict:
    from minima import engine as ds  # the only module that imports deepspeed

    out_dir = Path(cfg.run.out_dir)
    log = setup_logging(None if dry_run else out_dir, world.is_main)
    if world.is_main and not dry_run:
        (out_dir / "stopped.json").unlink(missing_ok=True)  # a previous stop's record; this run writes its own

    # Everything that can be wrong with the input is checked here, before any model is built.
    sources, valid_splits, student_hf, teacher_hf = _open_inputs(cfg, world)
    derived = derive(cfg, world.world_size, sum(count_windows(s.shards, cfg.data.seq_len) for s in sources))
    loader = TokenWindowLoader(
        sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.run.micro_batch_size,
        rank=world.rank,
        world_size=world.world_size,
        seed=cfg.data.seed,
        documents=cfg.data.documents,
        prefetch=cfg.data.prefetch * derived.grad_accum_steps,  # whole steps: the step takes its micro-batches at once
        pin_memory=world.device.type == "cuda",
    )
    tokenizer_dir, vocab_len = Path(cfg.data.dir) / "tokenizer", sources[0].shards.vocab_size
    bf16 = cfg.run.uses_bf16(world.device.type)
    dtype = torch.bfloat16 if bf16 else torch.float32
    attn = choose_attn_implementation(cfg.run.attn_implementation, world.device)
    compiled = cfg.kd.compile == "always" or (cfg.kd.compile == "auto" and world.device.type == "cuda")
    base_ds, repeats = load_ds_config(cfg.run.ds_config, "run.ds_config"), len(candidates or ()) or 1
    student_ds = ds.student_ds_config(cfg, derived, base_ds, bf16, repeats=repeats)  # a sandwich: C micro-steps each
    # Which checkpoint to continue from, decided (and converted for another world size) before any model is built.
    resume = plan_resume(
        out_dir,
        cfg.run.resume,
        world_size=world.world_size,
        ds_config=student_ds,
        student_config=student_hf,
        is_main=world.is_main,
        convert=not dry_run,
    )
    student_ds = resume_ds_config(student_ds, resume)
    teacher_base = load_ds_config(cfg.run.teacher_ds_config, "run.teacher_ds_config")
    # The memory plan, for every run; it decides teacher.placement=auto (replicated, node or zero3).
    plan_text, plan, placement = _memory_plan(
        cfg, world, student_hf, teacher_hf, bf16, attn, compiled, student_ds, teacher_base, vocab_len, log
    )
    teacher_ds = None
    if cfg.teacher is not None:
        teacher_ds = ds.teacher_ds_config(
            teacher_base,
            placement,
            micro_batch_size=cfg.run.micro_batch_size,
            bf16=bf16,
            gpus_per_node=world.local_world_size,
            path=cfg.run.teacher_ds_config,
        )
    runtime = {"dtype": str(dtype), "attn_implementation": attn, "device": str(world.device), "compiled_loss": compiled}
    runtime |= {"teacher_placement": placement if cfg.teacher else None, "sandwich_candidates": len(candidates or ())}
    resolved = {"config": cfg.to_dict(), "derived": vars(derived), "runtime": runtime, "memory_plan": plan}
    resolved |= {"student_ds_config": student_ds, "teacher_ds_config": teacher_ds}
    if world.is_main:
        print(json.dumps(resolved, indent=2, default=str), file=sys.stderr)
        if not dry_run:
            (out_dir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
    if dry_run:
        return resolved
    if plan_text:
        log.info(plan_text)
    log.info(
        f"{derived.world_size} ranks x {cfg.run.micro_batch_size} x {cfg.data.seq_len} tokens x"
        f" {derived.grad_accum_steps} accumulation = {derived.tokens_per_step} tokens/step;"
        f" {derived.total_steps} steps = {derived.total_tokens} tokens; warmup {derived.warmup_steps} steps"
    )
    if cfg.teacher is None:
        log.info("teacher: null -> plain language-model training, loss = CE on the next token")

    # The teacher first, then the student, each in its own ZeRO-3 scope when sharded. Same loading function for both.
    torch.manual_seed(cfg.run.seed)
    load = {"dtype": dtype, "attn_implementation": attn, "device": world.device}
    teacher = None
    if cfg.teacher is not None:
        teacher = ds.init_teacher(ds.load_model(cfg.teacher, teacher_hf, teacher_ds, **load), teacher_ds)
    student_model = ds.load_model(cfg.student, student_hf, student_ds, **load)
    if cfg.optim.neftune_alpha > 0:
        add_neftune(student_model, cfg.optim.neftune_alpha)
    if cfg.optim.router_jitter > 0:
        add_router_jitter(student_model, cfg.optim.router_jitter)
    student = ds.init_student(student_model, cfg, derived, student_ds)
    if candidates is not None:
        attach_candidates(student, candidates)
    n_student, n_teacher, n_active, flops_per_token = _param_counts(student, teacher, log)
    # The chunked loss computes logits as hidden @ head^T: check that this is what each model does, on a few tokens.
    probe = next(eval_batches(valid_splits[0], seq_len=cfg.data.seq_len, micro_batch_size=1, max_windows=1))
    for name, engine in (("student", student), ("teacher", teacher)):
        if engine is not None:
            check_head_path(name, engine, probe.input_ids[:, :32].to(world.device), ds.gathered)

    step, tokens_seen, teacher_val_loss = 0, 0, None
    early = EarlyStopping(cfg.run.early_stopping_patience)
    ckpt_root = out_dir / "checkpoints"
    if resume is not None:
        state = load_checkpoint(student, resume)
        changed = _changed_keys(state["config"], cfg.to_dict(), ignore={"run.resume"})
        if changed:
            log.warning(f"resuming {resume.path} with a changed config: {changed}")
        loader.load_state_dict(state["loader"])  # a global position: any world size continues where it stood
        step, tokens_seen, teacher_val_loss = state["step"], state["tokens_seen"], state["teacher_val_loss"]
        early.load_state_dict(state.get("early_stopping", early.state_dict()))
        how = f" (saved on {state['engine']['dp_world_size']} ranks: universal checkpoint)" if resume.universal else ""
        log.info(f"resumed from {resume.path} at step {step} ({tokens_seen} tokens){how}")

    monitor = Monitor(out_dir, is_main=world.is_main, total_steps=derived.total_steps, start_step=step)
    eval_windows = cfg.run.eval_tokens // cfg.data.seq_len or None

    def evaluate(model) -> tuple[float, float]:
        loss = held_out_loss(model, valid_splits, cfg, world, eval_windows)
        return loss, math.exp(min(loss, 700.0))  # perplexity = exp(loss in nats)

    if teacher is not None and teacher_val_loss is None:
        teacher_val_loss, teacher_ppl = evaluate(teacher)
        monitor.scalars(step, {"val/teacher_loss": teacher_val_loss, "val/teacher_ppl": teacher_ppl})

    peak = peak_flops(world.device)
    window = torch.zeros(6, dtype=torch.float64)  # loss, ce, kd, top1, valid tokens, balancing loss since the last log
    t_window, steps_in_window = time.perf_counter(), 0
    val_loss = val_ppl = None
    export_dir, dtype_name = out_dir / "export", str(dtype).removeprefix("torch.")
    about = {"student_params": n_student, "student_active_params": n_active, "teacher_params": n_teacher}
    about |= {"export_dir": str(export_dir)}
    about |= {"tensorboard_dir": str(monitor.tensorboard_dir), "data": sources[0].shards.index.get("chat")}
    about |= {"teacher_val_loss": teacher_val_loss}
    while step < derived.total_steps and not early.stopped:
        micro_batches = [next(loader) for _ in range(derived.grad_accum_steps)]
        micro_batches = draw_mixes(micro_batches, cfg.kd.mixup, key=(cfg.data.seed, step, world.rank))  # MixKD
        micro_batches = sandwich(micro_batches, candidates)  # MiniDisc: each micro-batch once per candidate
        window += train_step(
            student, teacher, micro_batches, cfg.kd, vocab_size=vocab_len, world=world, compiled=compiled
        )
        step += 1
        steps_in_window += 1
        tokens_seen += derived.tokens_per_step
        monitor.advance()

        last = step == derived.total_steps
        if step % cfg.run.log_every == 0 or last:
            total = all_reduce_sum(window, world.device).cpu()
            dt = time.perf_counter() - t_window
            tokens_per_s = steps_in_window * derived.tokens_per_step / dt
            scalars = _train_scalars(total, student, teacher is not None, tokens_seen, tokens_per_s, world, loader)
            if peak is not None:
                scalars["perf/mfu"] = flops_per_token * tokens_per_s / (world.world_size * peak)
            monitor.scalars(step, scalars, show=("train/loss", "perf/tokens_per_s"))
            window.zero_()
            t_window, steps_in_window = time.perf_counter(), 0

        # A stop request on any rank (signal or STOP file) is agreed on by all: the step is done, evaluation waits.
        stopping = all_reduce_max(float(stop.poll()), world.device) > 0
        if not stopping and (last or (cfg.run.eval_every and step % cfg.run.eval_every == 0)):
            val_loss, val_ppl = evaluate(student)
            monitor.scalars(step, {"val/loss": val_loss, "val/ppl": val_ppl})
            if early.update(step, val_loss) and early.patience:  # the best weights so far are the export
                now = {"step": step, "tokens_seen": tokens_seen, "val_loss": val_loss, "val_ppl": val_ppl}
                _export(ds, student, cfg, out_dir, tokenizer_dir, {**about, **now}, dtype_name, world, log)
            if early.stopped:
                log.info(f"early stopping: {early}; {export_dir} holds the weights of step {early.best_step}")
                last = True

        if last or stopping or (cfg.run.save_every and step % cfg.run.save_every == 0):
            state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "loader": loader.state_dict(),
                "teacher_val_loss": teacher_val_loss,
                "early_stopping": early.state_dict(),
                "config": cfg.to_dict(),
            }
            path, save_s = _save(student, ckpt_root, step, state, cfg, world, monitor, log)
        if stopping:
            monitor.close()
            return _record_stop(out_dir, step, path, save_s, stop.reason, world, log)

    if val_loss is None:  # resumed after the last step: evaluate the final weights once more
        val_loss, val_ppl = evaluate(student)
    metrics = {"step": step, "tokens_seen": tokens_seen, "val_loss": val_loss, "val_ppl": val_ppl, **about}
    metrics["early_stopping"] = early.state_dict()
    if not early.patience or not export_dir.is_dir():  # with early stopping, the best evaluation was exported
        _export(ds, student, cfg, out_dir, tokenizer_dir, metrics, dtype_name, world, log)
    if world.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    monitor.close()
    return metrics


def _param_counts(student, teacher, log) -> tuple[int, int, int, float]:
    """Parameters of both models (without input embeddings), the student's active ones, and the step's FLOPs per
    token, which follow the parameters a token goes through (an MoE model's active ones)."""
    n = [count_params(m.module) if m is not None else 0 for m in (student, teacher)]
    active = [count_params(m.module, active=True) if m is not None else 0 for m in (student, teacher)]
    log.info(
        f"student {n[0] / 1e6:.2f}M params (without input embedding), {active[0] / 1e6:.2f}M active per token;"
        f" teacher {n[1] / 1e6:.2f}M, {active[1] / 1e6:.2f}M active"
    )
    return (
        n[0],
        n[1],
        active[0],
        6 * active[0] + 2 * active[1],
    )  # forward+backward of the student, forward of the teacher


def _train_scalars(
    total: torch.Tensor, student, kd: bool, tokens_seen: int, tokens_per_s: float, world: World, loader
) -> dict:
    """The logged training scalars from the window's summed (loss, ce, kd, top1 agreement, valid tokens, balancing
    loss), an MoE student's routing statistics, and the tokens consumed per source of a mixture."""
    n = total[4].item()
    scalars = {
        "train/loss": total[0].item() / n,
        "train/ce_loss": total[1].item() / n,
        "train/lr": student.get_lr()[0],
        "train/grad_norm": float(student.get_global_grad_norm() or 0.0),
        "train/tokens_seen": tokens_seen,
        "perf/tokens_per_s": tokens_per_s,
        "perf/peak_memory_gb": all_reduce_max(peak_memory_gb(world.device), world.device),
    }
    if kd:
        scalars |= {"train/kd_loss": total[2].item() / n, "train/top1_agreement": total[3].item() / n}
    routing = student.module.pop_routing()  # an MoE student's expert loads and router entropy since the last log
    if routing is not None:
        scalars["train/balance_loss"] = total[5].item() / n
        scalars |= routing_scalars(all_reduce_sum(routing, world.device).cpu(), student.module.top_k)
    if len(loader.sources) > 1:
        for name, consumed in loader.consumed().items():
            scalars |= {f"data/{name}/tokens": consumed["tokens"], f"data/{name}/epoch": consumed["epoch"]}
    return scalars


def _save(student, ckpt_root: Path, step: int, state: dict, cfg: Config, world: World, monitor, log) -> tuple:
    """Checkpoint the student; the time and size go to the log and TensorBoard (a stop signal's lead must cover a
    step and this)."""
    t_save = time.perf_counter()
    path = save_checkpoint(student, ckpt_root, step, state, keep_last=cfg.run.keep_last, is_main=world.is_main)
    save_s = time.perf_counter() - t_save
    monitor.scalars(step, {"perf/checkpoint_save_s": save_s})
    size_gb = tree_bytes(path) / 1e9
    log.info(f"checkpoint {path} saved in {save_s:.1f} s ({size_gb:.2f} GB, {size_gb / save_s:.2f} GB/s)")
    return path, save_s


def _record_stop(out_dir: Path, step: int, path: Path, save_s: float, reason: str, world: World, log) -> dict:
    """After a stop's checkpoint: <out_dir>/stopped.json (what a job script reads to requeue), the STOP file
    consumed, and how to continue."""
    stopped = {"step": step, "checkpoint": str(path), "save_seconds": round(save_s, 3), "reason": reason}
    stopped["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    if world.is_main:
        write_atomic(out_dir / "stopped.json", json.dumps(stopped, indent=2))
        (out_dir / STOP_FILE).unlink(missing_ok=True)
    log.warning(
        f"stop requested ({reason}): checkpoint at step {step} saved in {save_s:.1f} s; exiting with status"
        f" {EXIT_REQUEUE}, run the same command again to resume (run.resume=auto)"
    )
    return {"stopped_at_step": step, **stopped}


def _export(ds, student, cfg: Config, out_dir: Path, tokenizer_dir: Path, metrics: dict, dtype: str, world, log):
    """The Hugging Face exports of the final student (training dtype; fp32 master weights when asked), each with
    its model card."""
    export = {"is_main": world.is_main, "context": cfg.data.seq_len}
    export_dir = Path(metrics["export_dir"])
    ds.export_hf(student, export_dir, tokenizer_dir, card=model_card(cfg, metrics, dtype=dtype), **export)
    log.info(f"exported the student (Hugging Face format) to {export_dir}")
    if cfg.run.export_fp32:
        fp32_dir = out_dir / "export_fp32"
        ds.export_hf_fp32(student, fp32_dir, tokenizer_dir, card=model_card(cfg, metrics, dtype="float32"), **export)
        log.info(f"exported the fp32 master weights to {fp32_dir}")


def _open_inputs(cfg: Config, world: World) -> tuple[list[Source], list[TokenShards], Any, Any]:
    """(training sources, their held-out splits, student config, teacher config or None): the data opened and checked
    (sizes and sample digests, or full checksums with data.verify_checksums) and the models' configs resolved."""
    data_dir = Path(cfg.data.dir)
    verify = {"verify_checksums": cfg.data.verify_checksums, "rank": world.rank, "world_size": world.world_size}
    names = cfg.data.sources or {"": 1.0}
    sources, valid_splits = [], []
    for name, weight in names.items():
        split_dir = data_dir / name
        if name and not split_dir.is_dir():
            found = sorted(p.parent.parent.name for p in data_dir.glob("*/train/index.json"))
            raise DataError(
                f"data.sources names {name!r}, but {split_dir} does not exist (sources in {data_dir}: {found}); prepare"
                f" it with tools/prepare_data.py --source {name} --out {data_dir}, or fix data.sources"
            )
        sources.append(Source(name, TokenShards.open(split_dir / "train", **verify), weight))
        valid_splits.append(TokenShards.open(split_dir / "valid", **verify))
    first = sources[0].shards
    for shards in [s.shards for s in sources] + valid_splits:
        check_packing(shards, cfg.data.seq_len)  # conversations are packed for one window length
        if shards.tokenizer.get("sha256") != first.tokenizer.get("sha256") or shards.vocab_size != first.vocab_size:
            raise DataError(
                f"{shards.path} was tokenized with {shards.tokenizer.get('source')} ({shards.vocab_size} ids), "
                f"{first.path} with {first.tokenizer.get('source')} ({first.vocab_size} ids): every source of a run "
                "needs the same tokenizer; prepare them again with one --tokenizer"
            )
    for shards in valid_splits:
        if count_windows(shards, cfg.data.seq_len) == 0:
            raise DataError(
                f"{shards.path} holds {shards.num_tokens} tokens, less than one window of data.seq_len + 1 ="
                f" {cfg.data.seq_len + 1}: prepare with a larger --valid-fraction or lower data.seq_len"
            )
    tokenizer_dir, vocab_len = data_dir / "tokenizer", first.vocab_size
    arch_defaults = {"vocab_size": vocab_len, "bos_token_id": first.bos_id, "eos_token_id": first.eos_id}
    student_hf = hf_config(cfg.student, "student", arch_defaults)
    check_vocab("student", cfg.student, student_hf, tokenizer_dir, vocab_len)
    teacher_hf = None
    if cfg.teacher is not None:
        teacher_hf = hf_config(cfg.teacher, "teacher", arch_defaults)
        check_vocab("teacher", cfg.teacher, teacher_hf, tokenizer_dir, vocab_len)
    return sources, valid_splits, student_hf, teacher_hf


def _memory_plan(
    cfg, world, student_hf, teacher_hf, bf16, attn, compiled, student_ds, teacher_base, vocab_len, log
) -> tuple[str | None, dict | None, str]:
    """(the plan as a table, as a dict, the teacher placement it resolves) for this run on this device."""
    requested = cfg.teacher.placement if cfg.teacher else "auto"
    try:
        teacher = None if teacher_hf is None else arch_from_hf_config(teacher_hf, "teacher")
        student = arch_from_hf_config(student_hf, "student")
    except ArchError as e:
        log.warning(f"no memory plan ({e}); teacher.placement=auto falls back to zero3, the least memory")
        return None, None, "zero3" if requested in ("auto", "node") else requested
    job = job_for(
        cfg,
        student,
        teacher,
        world_size=world.world_size,
        gpus_per_node=world.local_world_size,
        dtype_bytes=2 if bf16 else 4,
        attention=attn,
        student_ds=student_ds,
        teacher_ds=teacher_base,
        vocab_size=vocab_len,
        compiled=compiled,
    )
    choice = choose_placement(job, requested, device_memory_bytes(world.device, world.local_world_size))
    return format_choice(job, choice), choice.to_dict(), choice.placement


def train_step(
    student, teacher, micro_batches: list[Batch], kd: KDConfig, *, vocab_size: int, world: World, compiled: bool
) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns the sums of (loss, ce, kd, top1 agreement, valid
    tokens, balancing loss).

    ``student`` is the DeepSpeed engine (it updates at the accumulation boundary, after the last micro-batch);
    ``teacher`` is the frozen inference engine or None. Both run ``minima.models.HiddenStates``.
    """
    from minima.engine import gathered

    # Normalise once. The step's gradient must be that of  sum_{ranks, micro-batches} loss_sum / N  with N the valid
    # tokens of the whole step (all micro-batches, all ranks), as for one full batch. DeepSpeed averages gradients
    # over ranks (divides by world_size) and, by default, divides every micro-batch loss by the accumulation steps.
    # With scale_wrt_gas=False and each micro-batch's backward on  loss_sum * world_size / N :
    #   (1 / world_size) * sum_ranks sum_mb grad(loss_sum * world_size / N) = grad(sum loss_sum / N).
    # Each micro-batch's targets, and its rows' valid tokens: a MixKD micro-batch's mixed rows count with their
    # weights (minima.mixup). Host labels: no device sync.
    targets = [mixed_targets(mb.labels, mb.mix, kd.mixup.weight) for mb in micro_batches]
    row_valid = [row_tokens(t) for t in targets]
    num_valid = float(all_reduce_sum([float(sum(r.sum() for r in row_valid))], world.device)[0])
    student_head = output_head(student)
    teacher_head = output_head(teacher) if teacher is not None else None
    sums = torch.zeros(6, dtype=torch.float64, device=world.device)
    teacher_hidden, previous = None, None
    for mb, target, valid in zip(micro_batches, targets, row_valid, strict=True):
        # A sandwich repeats each micro-batch once per candidate: one copy to the device and one teacher forward
        # serve them all. With a mix, each model runs 2B rows: the originals, then its own mixed embeddings.
        if mb.input_ids is not previous:
            input_ids = _to_device(mb.input_ids, world.device)
            positions = None if mb.position_ids is None else _to_device(mb.position_ids, world.device)  # packed chats
            if teacher is not None:
                with torch.no_grad():
                    teacher_hidden = teacher(input_ids, position_ids=positions, mix=mb.mix)  # (B, T, H_t), decoder
        previous = mb.input_ids
        # The student engine returns its hidden states and its head (whole inside the block under ZeRO-3), so every
        # gradient, the head's included, flows back through the engine's outputs. The loss never holds more than
        # one chunk of logits; the backward runs inside the block so the head's gradient is reduced there.
        with gathered([student_head]):
            # (B, T, H_s), (V_s, H_s), (B,): each sequence's balancing loss (an MoE student; 0 for a dense one)
            student_hidden, head, balance = student(
                input_ids, student_head, position_ids=positions, mix=mb.mix, candidate=mb.candidate
            )
            with gathered([teacher_head]):
                terms = kd_loss_from_hidden(
                    student_hidden,
                    head,
                    target,  # on the host: finding the valid positions costs no device sync
                    teacher_hidden,
                    teacher_head,
                    **kd.loss_kwargs(),
                    vocab_size=vocab_size,
                    chunk_tokens=kd.chunk_tokens or None,
                    compiled=compiled,
                )
            # A sum like the others: each sequence's balancing loss weighted by its valid tokens (minima.moe).
            balance_sum = (balance * _to_device(valid.float(), world.device)).sum()
            loss_sum = terms.loss_sum + kd.balance_weight * balance_sum
            student.backward(loss_sum * world.world_size / max(num_valid, 1.0), scale_wrt_gas=False)
        student.step()  # DeepSpeed updates only at the accumulation boundary
        parts = (loss_sum.detach(), terms.ce_sum, terms.kd_sum, terms.top1_agree, terms.num_tokens, balance_sum)
        sums += torch.stack([p.double() for p in parts])
    return sums.cpu()  # one host sync per step


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loader's host tensor on ``device``, copied asynchronously from pinned memory on GPUs."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def held_out_loss(model, splits: list[TokenShards], cfg: Config, world: World, max_windows: int | None) -> float:
    """Mean next-token cross-entropy (nats) over held-out windows, summed over all ranks before dividing. With a
    mixture, ``max_windows`` is shared among the sources' held-out splits by their weights."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=world.device)
    weights = list((cfg.data.sources or {"": 1.0}).values())
    limits = [None if max_windows is None else max(1, round(max_windows * w / sum(weights))) for w in weights]
    batches = eval_batches(
        splits,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.run.micro_batch_size,
        rank=world.rank,
        world_size=world.world_size,
        max_windows=limits,
        documents=cfg.data.documents,
    )
    from minima.engine import gathered

    head = output_head(model)
    for mb in batches:  # every rank runs the same number of forwards (ZeRO-3 gathers inside)
        positions = None if mb.position_ids is None else _to_device(mb.position_ids, world.device)
        hidden = model(_to_device(mb.input_ids, world.device), position_ids=positions)  # (B, T, H)
        with gathered([head]):
            terms = kd_loss_from_hidden(hidden, head, mb.labels)  # no_grad: values only, no head gradient
        sums += torch.stack([terms.ce_sum.double(), terms.num_tokens.double()])
    model.train(was_training)
    total = all_reduce_sum(sums, world.device)
    return float(total[0] / total[1])


def _changed_keys(old: dict, new: dict, ignore: set[str], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b, key = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict) and key.count(".") < 1:
            keys += _changed_keys(a, b, ignore, f"{key}.")
        elif a != b and key not in ignore:
            keys.append(f"{key}: {a!r} -> {b!r}")
    return keys


STOP_FILE = "STOP"


class _StopFlag:
    """A stop request: one of STOP_SIGNALS on this rank, or (checked by the main rank) ``stop_file`` existing. The
    loop polls it at step boundaries and agrees on it across ranks. The previous handlers come back on exit."""

    def __init__(self, stop_file: Path, is_main: bool) -> None:
        self.stop_file, self.is_main = stop_file, is_main
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.reason == name:  # Ctrl-C twice: abort now
            raise KeyboardInterrupt
        self.reason = self.reason or name

    def poll(self) -> bool:
        if self.reason is None and self.is_main and self.stop_file.exists():
            self.reason = f"{self.stop_file} exists"
        return self.reason is not None


if __name__ == "__main__":
    sys.exit(main())
