"""The distillation step, side by side: minima's step against a MiniMA-style loop, and each teacher placement.

    python tools/bench_distill_step.py --ranks 2 --seq 512            # the CPU shapes (2 gloo ranks, fp32)
    python tools/bench_distill_step.py --device cuda --ranks 1 --dtype bf16 --seq 4096 --micro 4 \\
        --student 24x3072x8192 --teacher 32x4096x11008 --vocab 32000 --json bench_step_h200.json

Every case runs in a fresh ``torchrun`` world with the same models (random init from the same seed), the same
batches (seeded random tokens), the same student DeepSpeed JSON and the same ranks:

- ``minima``: ``minima.distill.train_step`` with the teacher placed as ``teacher.placement=auto`` decides;
- ``reference``: a MiniMA-style loop written here, after MiniMA's ``run_distillation_llama_ds.py``: both models built
  in one ZeRO-3 scope and wrapped by the same DeepSpeed config, the teacher called with labels, full logits of both
  models, ``0.5 * CE + 0.5 * soft_cross_entropy`` (mean over positions), the loss all-reduced and read on the host
  every micro-batch, ``engine.backward(loss)``;
- ``replicated``, ``node``, ``zero3``: minima's step with that teacher placement (on one node, ``node`` runs
  ZeRO++'s hierarchical partitioning with the whole world as the node, its degenerate case).

It reports tokens/s over the measured steps (with ``--repeat N``, the median of N interleaved runs of every case),
peak memory per rank (CPU: peak resident set, with large allocations returned to the system at once,
``MALLOC_MMAP_THRESHOLD_``; GPU: max allocated) and the part above the engines' resting state (the memory between
two steps once the optimizer state exists: where the loss and activations live), and, from one more instrumented
step (synchronised phases; collectives made blocking and timed), the share of the step spent in the teacher forward,
the student forward, the loss, backward, the optimizer step and in communication (collectives, part of the phases).
For minima's cases it also prints the memory plan's total against the measured peak above the memory before any
model was built. On GPUs it reports MFU, counting 6 N_student + 2 N_teacher FLOPs per token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = ("minima", "reference", "replicated", "node", "zero3")
PHASES = ("teacher_forward", "student_forward", "loss", "backward", "optimizer_step")


def parse_shape(text: str) -> tuple[int, int, int]:
    """'LAYERSxHIDDENxFFN' (e.g. 8x512x1536)."""
    try:
        layers, hidden, ffn = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LAYERSxHIDDENxFFN, e.g. 8x512x1536") from None
    return layers, hidden, ffn


def arch(shape: tuple[int, int, int], vocab: int, seq: int) -> dict:
    layers, hidden, ffn = shape
    heads = hidden // 128 if hidden >= 2048 else max(1, hidden // 64)  # head_dim 128 from 2048 wide, else 64
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": seq,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Memory and time probes.


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


class Memory:
    """Resident set (CPU) or allocated bytes (GPU) of this rank: now, and the peak since the last reset."""

    def __init__(self, device) -> None:
        self.device = device

    def now(self) -> int:
        import torch

        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else _status("VmRSS")

    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _status("VmHWM")


class Timers:
    """Seconds per named phase, synchronised with the device at both ends."""

    def __init__(self, device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.active = False

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            self.sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

        return timed


def time_collectives(timers: Timers) -> None:
    """Make DeepSpeed's collectives blocking and time them (only while ``timers.active``) as 'communication'."""
    import deepspeed.comm.comm as dscomm

    backend = dscomm.cdb
    names = (
        "all_reduce",
        "all_reduce_coalesced",
        "inference_all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_coalesced",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "broadcast",
        "all_to_all_single",
        "reduce",
    )
    for name in names:
        fn = getattr(backend, name, None)
        if fn is None:
            continue

        def blocking(*args, _fn=fn, **kwargs):
            if not timers.active:
                return _fn(*args, **kwargs)
            timers.sync()
            t = time.perf_counter()
            work = _fn(*args, **kwargs)
            if work is not None and hasattr(work, "wait"):
                work.wait()
            timers.sync()
            timers.seconds["communication"] = timers.seconds.get("communication", 0.0) + time.perf_counter() - t
            return work

        setattr(backend, name, blocking)


# ----------------------------------------------------------------------------------------------------------------------
# One case, in a torchrun world.


def batches(args, rank: int, step: int):
    """This rank's micro-batches of step ``step``: seeded random tokens (the same in every case)."""
    import torch

    from minima.data import Batch

    out = []
    for k in range(args.accum):
        g = torch.Generator().manual_seed(10_000 * step + 100 * rank + k)
        window = torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=g)
        out.append(Batch(input_ids=window[:, :-1].contiguous(), labels=window[:, 1:].contiguous()))
    return out


def worker(args) -> None:
    import torch

    from minima.dist import all_reduce_max, init_world, shutdown

    world = init_world()
    from minima import engine as ds
    from minima.config import load_config, load_ds_config
    from minima.distill import train_step
    from minima.memory import choose, job_for
    from minima.models import count_params, hf_config
    from minima.monitor import device_memory_bytes, peak_flops

    memory, timers = Memory(world.device), Timers(world.device)
    bf16 = args.dtype == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    s_arch, t_arch = arch(args.student, args.vocab, args.seq), arch(args.teacher, args.vocab, args.seq)
    tokens_per_step = args.micro * args.seq * args.accum * world.world_size
    overrides = [
        "data.dir=(random tokens)",
        f"data.seq_len={args.seq}",
        f"student.arch={json.dumps(s_arch)}",
        "teacher.path=null",
        f"teacher.arch={json.dumps(t_arch)}",
        f"teacher.placement={args.case if args.case in ('replicated', 'node', 'zero3') else 'auto'}",
        f"run.micro_batch_size={args.micro}",
        f"run.tokens_per_step={tokens_per_step}",
        f"run.max_steps={args.warmup + args.steps + 1}",
        f"run.ds_config={args.ds_config}",
        f"run.precision={args.dtype}",
        f"run.attn_implementation={args.attention}",
        f"run.activation_checkpointing={str(bool(args.activation_checkpointing)).lower()}",
        f"kd.compile={args.compile}",
    ]
    cfg = load_config("tiny_cpu", overrides)
    from minima.config import derive

    derived = derive(cfg, world.world_size)
    student_ds = ds.student_ds_config(cfg, derived, load_ds_config(cfg.run.ds_config, "run.ds_config"), bf16)
    teacher_base = load_ds_config(cfg.run.teacher_ds_config, "run.teacher_ds_config")
    defaults = {"vocab_size": args.vocab}
    student_hf, teacher_hf = hf_config(cfg.student, "student", defaults), hf_config(cfg.teacher, "teacher", defaults)
    compiled = args.compile == "always" or (args.compile == "auto" and world.device.type == "cuda")
    from minima.arch import arch_from_hf_config

    job = job_for(
        cfg,
        arch_from_hf_config(student_hf, "student"),
        arch_from_hf_config(teacher_hf, "teacher"),
        world_size=world.world_size,
        gpus_per_node=world.local_world_size,
        dtype_bytes=2 if bf16 else 4,
        attention=args.attention,
        student_ds=student_ds,
        teacher_ds=teacher_base,
        vocab_size=args.vocab,
        compiled=compiled,
    )
    base = memory.now()  # before any model is built
    torch.manual_seed(0)
    load = {"dtype": dtype, "attn_implementation": args.attention, "device": world.device}
    result: dict = {"case": args.case}
    if args.case == "reference":
        step_fn, student, teacher = build_reference(cfg, student_hf, teacher_hf, student_ds, load, world, timers)
        result["placement"] = "zero3 (same config as the student)"
    else:
        choice = choose(job, cfg.teacher.placement, device_memory_bytes(world.device, world.local_world_size))
        placement = choice.placement
        if args.case == "node":
            placement = "node"  # one node: hpZ over the whole world (choose() would call it zero3)
        teacher_ds = ds.teacher_ds_config(
            teacher_base,
            placement,
            micro_batch_size=args.micro,
            bf16=bf16,
            gpus_per_node=world.local_world_size,
            path=cfg.run.teacher_ds_config,
        )
        teacher = ds.init_teacher(ds.load_model(cfg.teacher, teacher_hf, teacher_ds, **load), teacher_ds)
        student = ds.init_student(ds.load_model(cfg.student, student_hf, student_ds, **load), cfg, derived, student_ds)
        import minima.distill as distill

        teacher.forward = timers.wrap("teacher_forward", teacher.forward)
        student.forward = timers.wrap("student_forward", student.forward)
        student.backward = timers.wrap("backward", student.backward)
        student.step = timers.wrap("optimizer_step", student.step)
        distill.kd_loss_from_hidden = timers.wrap("loss", distill.kd_loss_from_hidden)

        def step_fn(mbs):
            return train_step(student, teacher, mbs, cfg.kd, vocab_size=args.vocab, world=world, compiled=compiled)

        result["placement"] = placement
        result["plan"] = choice.plans.get(placement, next(iter(choice.plans.values()))).to_dict()
        if placement not in choice.plans:
            from minima.memory import plan

            result["plan"] = plan(job, placement, device_memory_bytes(world.device, 1)).to_dict()
    time_collectives(timers)
    built = memory.now()

    step = 0
    for _ in range(args.warmup):  # compiles, allocates the optimizer state, fills caches
        step_fn(batches(args, world.rank, step))
        step += 1
    timers.sync()
    resting = memory.now()
    memory.reset_peak()
    started = time.perf_counter()
    for _ in range(args.steps):
        step_fn(batches(args, world.rank, step))
        step += 1
    timers.sync()
    elapsed = time.perf_counter() - started
    peak = memory.peak()
    timers.active = True  # one instrumented step: synchronised phases, blocking collectives
    t = time.perf_counter()
    step_fn(batches(args, world.rank, step))
    timers.sync()
    instrumented = time.perf_counter() - t
    timers.active = False

    tokens_per_s = args.steps * tokens_per_step / all_reduce_max(elapsed, world.device)
    n_student, n_teacher = count_params(student), count_params(teacher)
    flops = peak_flops(world.device)
    shares = {k: v / instrumented for k, v in timers.seconds.items()}
    shares["other"] = max(0.0, 1.0 - sum(v for k, v in shares.items() if k in PHASES))
    result.update(
        world_size=world.world_size,
        tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_s,
        step_s=elapsed / args.steps,
        instrumented_step_s=instrumented,
        shares=shares,
        peak_bytes=int(all_reduce_max(peak, world.device)),
        resting_bytes=int(all_reduce_max(resting, world.device)),
        above_resting_bytes=int(all_reduce_max(peak - resting, world.device)),
        built_above_base_bytes=int(all_reduce_max(built - base, world.device)),
        peak_above_base_bytes=int(all_reduce_max(peak - base, world.device)),
        student_params=n_student,
        teacher_params=n_teacher,
        mfu=None if flops is None else (6 * n_student + 2 * n_teacher) * tokens_per_s / (world.world_size * flops),
        device=str(world.device) if world.device.type != "cuda" else torch.cuda.get_device_name(world.device),
        dtype=args.dtype,
        attention=args.attention,
    )
    if world.is_main:
        Path(args.out).write_text(json.dumps(result, indent=2))
    shutdown()


def build_reference(cfg, student_hf, teacher_hf, ds_config, load, world, timers):
    """A MiniMA-style loop: both models in one ZeRO-3 scope and one DeepSpeed config, full logits, soft CE."""
    import deepspeed
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from minima.dist import init_deepspeed_comm
    from minima.optim import param_groups

    kwargs = {"dtype": load["dtype"], "attn_implementation": load["attn_implementation"]}
    init_deepspeed_comm()  # wraps the process group: zero.Init then sees the real world size
    hf_ds = HfDeepSpeedConfig(ds_config)
    t_model = AutoModelForCausalLM.from_config(teacher_hf, **kwargs)
    s_model = AutoModelForCausalLM.from_config(student_hf, **kwargs)
    del hf_ds
    unset_hf_deepspeed_config()
    teacher, *_ = deepspeed.initialize(model=t_model, model_parameters=list(t_model.parameters()), config=ds_config)
    teacher.eval()
    optimizer = torch.optim.AdamW(
        param_groups(s_model.named_parameters(), 0.1), lr=3e-4, betas=(0.9, 0.95), fused=torch.cuda.is_available()
    )
    student, *_ = deepspeed.initialize(model=s_model, optimizer=optimizer, config=ds_config)

    def soft_cross_entropy(student_logits, teacher_logits):
        return -(F.softmax(teacher_logits, dim=-1) * F.log_softmax(student_logits, dim=-1)).sum(-1).mean()

    teacher_forward = timers.wrap("teacher_forward", lambda ids: teacher(input_ids=ids, labels=ids))
    student_forward = timers.wrap("student_forward", lambda ids: student(input_ids=ids, labels=ids))
    loss_fn = timers.wrap("loss", lambda s, t: 0.5 * s.loss + 0.5 * soft_cross_entropy(s.logits, t.logits))
    backward = timers.wrap("backward", student.backward)
    optimizer_step = timers.wrap("optimizer_step", student.step)

    def step_fn(mbs):
        for mb in mbs:
            ids = mb.input_ids.to(world.device)
            with torch.no_grad():
                t_out = teacher_forward(ids)
            s_out = student_forward(ids)
            loss = loss_fn(s_out, t_out)
            logged = loss.detach().clone()
            torch.distributed.all_reduce(logged)
            logged.item()  # MiniMA logs the loss of every micro-batch
            backward(loss)
            optimizer_step()

    return step_fn, student, teacher


# ----------------------------------------------------------------------------------------------------------------------
# The driver.


def run_case(args, case: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="")
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large frees go back to the system: RSS follows live tensors
    from minima.dist import free_port

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", str(args.ranks), "--master_port", str(free_port()), __file__]
    cmd += ["--worker", case, "--out", str(out)]
    cmd += forwarded(args)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t
    return result


def forwarded(args) -> list[str]:
    return [
        "--seq", str(args.seq), "--micro", str(args.micro), "--accum", str(args.accum), "--vocab", str(args.vocab),
        "--student", "x".join(map(str, args.student)), "--teacher", "x".join(map(str, args.teacher)),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype, "--device", args.device,
        "--attention", args.attention, "--ds-config", args.ds_config, "--compile", args.compile,
        "--activation-checkpointing", str(int(args.activation_checkpointing)),
    ]  # fmt: skip


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def report(results: list[dict]) -> str:
    ref = next((r for r in results if r["case"] == "reference"), None)
    lines = [
        f"{'case':<11} {'teacher':<12} {'tokens/s':>9} {'vs ref':>7} {'peak GiB':>9} {'above rest':>10} "
        f"{'vs ref':>7}  step shares (teacher fwd / student fwd / loss / backward / opt step / comm)"
    ]
    for r in results:
        s = r["shares"]
        shares = " / ".join(f"{100 * s.get(k, 0):.0f}%" for k in (*PHASES, "communication"))
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else ""
        mem = f"{r['above_resting_bytes'] / ref['above_resting_bytes']:.2f}x" if ref else ""
        placement = r["placement"].split(" ")[0]
        lines.append(
            f"{r['case']:<11} {placement:<12} {r['tokens_per_s']:>9.1f} {speed:>7} {gib(r['peak_bytes']):>9}"
            f" {gib(r['above_resting_bytes']):>10} {mem:>7}  {shares}"
        )
    for r in results:
        if "plan" in r:
            lines.append(
                f"{r['case']}: memory plan {gib(r['plan']['total'])} GiB per rank vs measured peak above the"
                f" pre-model memory {gib(r['peak_above_base_bytes'])} GiB"
                f" ({r['plan']['total'] / max(1, r['peak_above_base_bytes']):.2f}x)"
            )
        if r.get("mfu") is not None:
            lines.append(f"{r['case']}: MFU {100 * r['mfu']:.1f}% (6 N_student + 2 N_teacher FLOPs per token)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro", type=int, default=2, help="sequences per rank per micro-batch")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per rank per step")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--student", type=parse_shape, default=(8, 512, 1536), help="LAYERSxHIDDENxFFN")
    parser.add_argument("--teacher", type=parse_shape, default=(8, 768, 2048), help="LAYERSxHIDDENxFFN")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--ds-config", default="ds_configs/zero3.json", help="the student's (and reference's) JSON")
    parser.add_argument("--compile", default="auto", choices=["auto", "always", "never"], help="kd.compile")
    parser.add_argument("--activation-checkpointing", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank on CPU")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every case (interleaved); the median is shown")
    parser.add_argument("--json", help="write every case's figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.case = args.worker
        worker(args)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA GPU here; use --device cpu, or run on a GPU machine")
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):  # interleaved, so that a slow spell of a shared machine hits every case
            for case in cases:
                print(f"running {case} ({r + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                runs[case].append(run_case(args, case, Path(tmp) / f"{case}_{r}.json"))
    results = []
    for case in cases:
        ordered = sorted(runs[case], key=lambda x: x["tokens_per_s"])
        result = dict(ordered[(len(ordered) - 1) // 2])  # the median run (the lower one of two)
        result["tokens_per_s_runs"] = [x["tokens_per_s"] for x in runs[case]]
        results.append(result)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out", "json")}
    text = report(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
