"""2 ranks x 2 micro-batches under ZeRO-3 vs one process on the full batch: the step's gradients must be equal.

    torchrun --standalone --nproc_per_node 2 tests/distributed/grad_equivalence.py WORK_DIR [DIVERGENCE]

WORK_DIR holds teacher/ and student/ (tiny HF models) and ds_student.json / ds_teacher.json (stage 3, persistence
threshold 0, so every parameter is really sharded). The student engine uses SGD with no clipping, so the weight change
of one step is -LR * gradient (Adam would hide a wrong loss scale); LR is large so that the change dwarfs fp32 rounding
of the weights themselves. Rank 0 recomputes the
step in plain PyTorch on the concatenated batch with loss = sum / N and writes the comparison to WORK_DIR/result.json.
"""

import json
import sys
from pathlib import Path

import torch

from minima.config import KDConfig
from minima.data import IGNORE_INDEX, Batch
from minima.dist import init_world, shutdown

MICRO, SEQ, ACCUM, VOCAB = 2, 12, 2, 40  # tokenizer length 40; the teacher head is padded to 48
LR = 1000.0


def micro_batches(rank: int) -> list[Batch]:
    """Rank- and micro-batch-dependent padding, so that per-micro-batch means would weigh tokens wrongly."""
    out = []
    for k in range(ACCUM):
        g = torch.Generator().manual_seed(100 * rank + k)
        ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
        labels = ids[:, 1:].clone()
        n_ignored = [0, 3, 9, 11][2 * rank + k]  # 0 .. 11 of 12 positions ignored in row 0
        labels[0, SEQ - n_ignored :] = IGNORE_INDEX
        out.append(Batch(input_ids=ids[:, :-1], labels=labels))
    return out


def main() -> None:
    work = Path(sys.argv[1])
    world = init_world()
    import deepspeed

    from minima import engine as ds
    from minima.distill import train_step
    from minima.losses import kd_loss_from_logits

    divergence = sys.argv[2] if len(sys.argv) > 2 else "forward_kl"
    # chunk_tokens=5: each micro-batch's loss runs over several chunks of the gathered heads
    kd = KDConfig(ce_weight=0.3, kd_weight=0.7, temperature=2.0, divergence=divergence, beta=0.3, chunk_tokens=5)
    student_ds = json.loads((work / "ds_student.json").read_text())
    teacher_ds = json.loads((work / "ds_teacher.json").read_text())
    student_ds.update(
        train_batch_size=MICRO * ACCUM * world.world_size,
        train_micro_batch_size_per_gpu=MICRO,
        gradient_accumulation_steps=ACCUM,
        gradient_clipping=0.0,
        zero_allow_untested_optimizer=True,  # SGD: a probe whose update is exactly -lr * grad
    )
    teacher_ds.update(train_micro_batch_size_per_gpu=MICRO)
    from transformers import AutoConfig

    from minima.config import ModelConfig

    def load(name, ds_config):
        mc = ModelConfig(path=str(work / name))
        return ds.load_model(
            mc, AutoConfig.from_pretrained(mc.path), ds_config, dtype=torch.float32, attn_implementation="sdpa"
        )

    teacher = ds.init_teacher(load("teacher", teacher_ds), teacher_ds)
    model = load("student", student_ds)
    sharded = all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters())
    student, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=student_ds
    )
    params = dict(student.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        before = {n: p.detach().clone() for n, p in params.items()}
    sums = train_step(student, teacher, micro_batches(world.rank), kd, vocab_size=VOCAB, world=world)
    grad_norm = float(student.get_global_grad_norm())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        grads = {n: (before[n] - p.detach()) / LR for n, p in params.items()}

    if world.is_main:
        from transformers import AutoModelForCausalLM

        ref_student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
        ref_teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval()
        batches = [mb for r in range(world.world_size) for mb in micro_batches(r)]
        ids = torch.cat([mb.input_ids for mb in batches])
        labels = torch.cat([mb.labels for mb in batches])
        with torch.no_grad():
            t_logits = ref_teacher(input_ids=ids).logits
        # The reference takes the plain path: full logits of both models, one batch, sum / N.
        terms = kd_loss_from_logits(
            ref_student(input_ids=ids).logits, t_logits, labels, **kd.loss_kwargs(), vocab_size=VOCAB
        )
        (terms.loss_sum / terms.num_tokens).backward()
        ref = {n: p.grad for n, p in ref_student.named_parameters()}
        rel = {n: float((grads[n] - ref[n]).norm() / ref[n].norm()) for n in ref}
        ref_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref.values())))
        # The usual bug, for contrast: the mean of per-micro-batch means (what averaging losses per micro-batch gives).
        ref_student.zero_grad()
        for mb in batches:
            with torch.no_grad():
                t = ref_teacher(input_ids=mb.input_ids).logits
            mb_terms = kd_loss_from_logits(
                ref_student(input_ids=mb.input_ids).logits, t, mb.labels, **kd.loss_kwargs(), vocab_size=VOCAB
            )
            (mb_terms.loss_sum / mb_terms.num_tokens / len(batches)).backward()
        naive = {n: p.grad for n, p in ref_student.named_parameters()}
        naive_rel = max(float((naive[n] - ref[n]).norm() / ref[n].norm()) for n in ref)
        result = {
            "sharded": sharded,
            "max_rel_err": max(rel.values()),
            "worst": max(rel, key=rel.get),
            "per_micro_batch_mean_rel_err": naive_rel,
            "grad_norm": grad_norm,
            "ref_grad_norm": ref_norm,
            "local_valid_tokens": float(sums[4]),
            "ref_valid_tokens": int(terms.num_tokens),
        }
        (work / "result.json").write_text(json.dumps(result, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
