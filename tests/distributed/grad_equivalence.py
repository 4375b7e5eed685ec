"""2 ranks x ACCUM micro-batches vs one process on the full batch: the step's gradients must be equal.

    torchrun --standalone --nproc_per_node 2 tests/distributed/grad_equivalence.py WORK_DIR STUDENT_JSON \
        --accum 2 --placement zero3 --divergence forward_kl

WORK_DIR holds teacher/ and student/ (tiny HF models) and ds_teacher.json (the sharded teacher's ZeRO-3 settings,
persistence threshold 0, so every parameter is really sharded). STUDENT_JSON is the student engine's DeepSpeed JSON
(ZeRO stage 1, 2 or 3, with or without offload). The student engine uses SGD with no clipping, so the weight change of
one step is -LR * gradient (Adam would hide a wrong loss scale); LR is large so that the change dwarfs fp32 rounding of
the weights themselves. Rank 0 recomputes the step in plain PyTorch on the concatenated batch with loss = sum / N,
checks the teacher's hidden states and the loss against it, and writes the comparison to WORK_DIR/<name>.json.
With --mixup W, every rank's first micro-batch is also trained on its MixKD copy (kd.mixup.weight W), and the
reference adds the mixed terms from full logits on each model's mixed input embeddings. With --candidates, the
student runs MiniDisc's sandwich over two candidate assistants (masks on its own shape), and the reference is the
mean of the candidates' losses, each computed on the masked plain model.
"""

import argparse
import json
from pathlib import Path

import torch

from minima.candidates import CandidateMasks, attach_candidates, candidate_plans, sandwich
from minima.config import KDConfig, MixupConfig
from minima.data import Batch
from minima.dist import all_reduce_sum, init_world, shm_segment, shutdown
from minima.importance import Importance, Shape
from minima.mixup import Mix
from minima.shards import IGNORE_INDEX

MICRO, SEQ, VOCAB = 2, 12, 40  # tokenizer length 40; the teacher head is padded to 48
LR = 1000.0


def micro_batches(rank: int, accum: int, mixup: bool = False) -> list[Batch]:
    """Rank- and micro-batch-dependent padding, so that per-micro-batch means would weigh tokens wrongly; with
    ``mixup``, the first micro-batch mixed (its two rows paired, lambda 0.3)."""
    out = []
    for k in range(accum):
        g = torch.Generator().manual_seed(100 * rank + k)
        ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
        labels = ids[:, 1:].clone()
        n_ignored = (3 * k + 5 * rank) % SEQ  # 0 .. 11 of 12 positions ignored in row 0
        labels[0, SEQ - n_ignored :] = IGNORE_INDEX
        mix = Mix(partner=torch.tensor([1, 0]), lam=0.3) if mixup and k == 0 else None
        out.append(Batch(input_ids=ids[:, :-1], labels=labels, mix=mix))
    return out


def candidate_masks(config) -> CandidateMasks:
    """Two candidate assistants on the student's own shape, from a seeded random importance (the same on all ranks)."""
    shape = Shape.of(config)
    g = torch.Generator().manual_seed(7)
    imp = Importance(
        heads=torch.rand(shape.layers, shape.heads, generator=g, dtype=torch.float64),
        neurons=torch.rand(shape.layers, shape.ffn, generator=g, dtype=torch.float64),
        hidden=torch.rand(shape.hidden, generator=g, dtype=torch.float64),
        cos_sum=torch.zeros(shape.layers, dtype=torch.float64),
        tokens=1,
    )
    sparsities = (0.3, 0.6)
    return CandidateMasks.from_plans(candidate_plans(imp, shape, sparsities), shape, sparsities)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("student_json", type=Path)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--placement", default="zero3", choices=["replicated", "node", "zero3"])
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--name", default="result")
    parser.add_argument("--mixup", type=float, default=0.0, help="kd.mixup.weight; 0 = no mixed micro-batch")
    parser.add_argument("--candidates", action="store_true", help="a sandwich step over two candidate assistants")
    args = parser.parse_args()
    work = args.work
    world = init_world()
    import deepspeed
    from transformers import AutoConfig

    from minima import engine as ds
    from minima.config import ModelConfig
    from minima.distill import train_step
    from minima.losses import kd_loss_from_logits

    # chunk_tokens=5: each micro-batch's loss runs over several chunks of the gathered heads
    # balance_weight=0.5: for an MoE student, the balancing loss weighs visibly in the gradient
    kd = KDConfig(
        ce_weight=0.3,
        kd_weight=0.7,
        temperature=2.0,
        divergence=args.divergence,
        beta=0.3,
        chunk_tokens=5,
        balance_weight=0.5,
        mixup=MixupConfig(enabled=args.mixup > 0, weight=args.mixup or 1.0),
    )
    masks = candidate_masks(AutoConfig.from_pretrained(work / "student")) if args.candidates else None
    repeats = len(masks) if masks else 1  # the sandwich: one accumulation micro-step per candidate
    student_ds = json.loads(args.student_json.read_text())
    student_ds.update(
        train_batch_size=MICRO * args.accum * world.world_size * repeats,
        train_micro_batch_size_per_gpu=MICRO,
        gradient_accumulation_steps=args.accum * repeats,
        gradient_clipping=0.0,
        zero_allow_untested_optimizer=True,  # SGD: a probe whose update is exactly -lr * grad
        zero_force_ds_cpu_optimizer=False,  # ... also where ZeRO-Offload would insist on its CPU Adam
    )
    teacher_ds = ds.teacher_ds_config(
        json.loads((work / "ds_teacher.json").read_text()),
        args.placement,
        micro_batch_size=MICRO,
        bf16=False,
        gpus_per_node=world.local_world_size,  # under --standalone, both ranks: the node is the whole world
        path="ds_teacher.json",
    )

    def load(name, ds_config):
        mc = ModelConfig(path=str(work / name))
        config = AutoConfig.from_pretrained(mc.path)
        return ds.load_model(
            mc, config, ds_config, dtype=torch.float32, attn_implementation="sdpa", device=world.device
        )

    teacher = ds.init_teacher(load("teacher", teacher_ds), teacher_ds)
    teacher_params = list(teacher.module.parameters())
    teacher_layout = {
        "sharded": all(getattr(p, "ds_tensor", p).numel() < getattr(p, "ds_numel", 0) for p in teacher_params),
        "node_shard": all(getattr(p, "ds_secondary_tensor", None) is not None for p in teacher_params),
    }
    model = load("student", student_ds)
    stage = ds.zero_stage(student_ds)
    # (an MoE student's empty shared expert has nothing to shard)
    sharded = stage < 3 or all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if p.ds_numel > 0)
    from minima.models import HiddenStates

    student, *_ = deepspeed.initialize(
        model=HiddenStates(model), optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=student_ds
    )
    if masks is not None:
        attach_candidates(student, masks)
    params = dict(student.module.lm.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        before = {n: p.detach().clone() for n, p in params.items()}
    mine = micro_batches(world.rank, args.accum, args.mixup > 0)
    with torch.no_grad():
        teacher_hidden = teacher(mine[0].input_ids)  # (B, T, H_t) of this rank's first micro-batch
    step_batches = sandwich(mine, masks)
    sums = train_step(student, teacher, step_batches, kd, vocab_size=VOCAB, world=world, compiled=False)
    total = all_reduce_sum(sums, world.device)
    grad_norm = float(student.get_global_grad_norm())
    routing = student.module.pop_routing()  # an MoE student: tokens per (layer, expert) on this rank
    by_rank = None
    if routing is not None:
        by_rank = torch.zeros(world.world_size, *routing.shape, dtype=torch.float64)
        by_rank[world.rank] = routing.cpu()
        by_rank = all_reduce_sum(by_rank, world.device).cpu()
    with deepspeed.zero.GatheredParameters(list(params.values())):
        grads = {n: (before[n] - p.detach()) / LR for n, p in params.items()}

    if world.is_main:
        from transformers import AutoModelForCausalLM

        from minima.moe import balance_loss

        ref_student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
        moe = by_rank is not None
        ref_teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval()
        batches = [mb for r in range(world.world_size) for mb in micro_batches(r, args.accum, args.mixup > 0)]
        ids = torch.cat([mb.input_ids for mb in batches])
        labels = torch.cat([mb.labels for mb in batches])
        with torch.no_grad():
            t_logits = ref_teacher(input_ids=ids).logits
            ref_hidden = ref_teacher.model(input_ids=mine[0].input_ids).last_hidden_state
        # The reference takes the plain path: full logits of both models, one batch, sum / N; a sandwich sums
        # every candidate's terms (its masks on the plain model) and counts its tokens once per candidate.
        ref_masks = candidate_masks(ref_student.config) if masks is not None else None
        hooks = ref_masks.install(ref_student) if ref_masks is not None else None
        loss_sum, count = 0.0, 0.0
        for c in range(len(ref_masks)) if ref_masks is not None else [None]:
            if ref_masks is not None:
                ref_masks.select(c)
            out = ref_student(input_ids=ids, output_router_logits=moe)
            terms = kd_loss_from_logits(out.logits, t_logits, labels, **kd.loss_kwargs(), vocab_size=VOCAB)
            loss_sum = loss_sum + terms.loss_sum
            if moe:  # each sequence's balancing loss, weighted by its valid tokens (minima.moe)
                balance = balance_loss(out.router_logits, ids.shape[0], ref_student.config.num_experts_per_tok)
                loss_sum = loss_sum + kd.balance_weight * (balance * (labels != IGNORE_INDEX).sum(1)).sum()
            count += float(terms.num_tokens)
            for mb in (mb for mb in batches if mb.mix is not None):  # MixKD: each model on its own mixed embeddings
                p, lam = mb.mix.partner, mb.mix.lam
                s_emb = ref_student.get_input_embeddings()(mb.input_ids)
                t_emb = ref_teacher.model.embed_tokens(mb.input_ids)
                s_mixed = ref_student(inputs_embeds=lam * s_emb + (1 - lam) * s_emb[p]).logits
                with torch.no_grad():
                    t_mixed = ref_teacher(inputs_embeds=lam * t_emb + (1 - lam) * t_emb[p]).logits
                for mixed_labels, share in ((mb.labels, lam), (mb.labels[p], 1 - lam)):
                    mixed = kd_loss_from_logits(s_mixed, t_mixed, mixed_labels, **kd.loss_kwargs(), vocab_size=VOCAB)
                    loss_sum = loss_sum + args.mixup * share * mixed.loss_sum
                    count += args.mixup * share * float(mixed.num_tokens)
        (loss_sum / count).backward()
        if hooks is not None:
            hooks.remove()
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
            "stage": stage,
            "placement": args.placement,
            "accum": args.accum,
            "sharded": sharded,
            "teacher": teacher_layout,
            "teacher_hidden_max_abs_err": float((teacher_hidden - ref_hidden).abs().max()),
            "loss_sum": float(total[0]),
            "ref_loss_sum": float(loss_sum),
            "max_rel_err": max(rel.values()),
            "worst": max(rel, key=rel.get),
            "per_micro_batch_mean_rel_err": naive_rel,
            "grad_norm": grad_norm,
            "ref_grad_norm": ref_norm,
            "valid_tokens": float(total[4]),
            "ref_valid_tokens": count,
            "shm_segments_left": [str(p) for r in range(world.world_size) if (p := shm_segment(r)).exists()],
        }
        if moe:  # (rank, layer, expert) token counts: experts one rank never used while the other did
            experts = by_rank[..., :-2]
            result["balance_sum"] = float(total[5])
            result["experts_idle_on_one_rank"] = int(((experts == 0) & (experts.flip(0) > 0)).sum())
            result["expert_grad_norms"] = [
                float(g) for g in ref["model.layers.0.mlp.experts.down_proj"].norm(dim=(1, 2))
            ]
        (work / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
