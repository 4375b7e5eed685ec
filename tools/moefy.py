"""A mixture-of-experts student from a dense llama/mistral/qwen2 model (MiniMoE, MiniMix): ``minima.moefy``.

MiniMoE's split (the default): each layer's FFN dealt out to 8 experts, 2/3 of each expert common, 1/3 its own:

    python tools/moefy.py --dense /ckpt/minima-3b --experts 8 --out /ckpt/minima-moe-init

the same with the neurons first put in order of importance on calibration data (the common block = the most important):

    python tools/moefy.py --dense /ckpt/minima-3b --experts 8 --calib /data/minima-pretrain/train --out DIR

MiniMix / sparse upcycling: every expert a copy of the dense FFN and its down_proj times E, so the student starts near
the dense model's function (exactly, with --gate zeros, when E is a power of two; for checking, not training: every
token then ties on expert 0):

    python tools/moefy.py --dense /ckpt/minima-3b --experts 4 --mode upcycle --out DIR

The student is a qwen2_moe Hugging Face directory (safetensors, config, the dense model's tokenizer files) plus
``moefy.json`` recording how it was made; ``minima.distill ... student='{path: DIR}'`` distils into it. Only FFN
experts: MiniMoE's attention experts are not a standard Hugging Face layer. Prints the record as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction

from minima.moefy import GATES, MODES, MoefyError, moefy
from minima.shards import DataError


def fraction(text: str) -> float:
    """A number or a ratio such as 2/3."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a ratio like 2/3") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True, metavar="DIR", help="local Hugging Face llama/mistral/qwen2 model")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory for the MoE student")
    parser.add_argument("--experts", type=int, required=True, metavar="E", help="experts per layer (>= 2)")
    parser.add_argument(
        "--mode", choices=MODES, default="split", help="split: MiniMoE (default); upcycle: MiniMix, E dense copies"
    )
    parser.add_argument("--top-k", type=int, default=1, help="experts per token, num_experts_per_tok (default 1)")
    parser.add_argument(
        "--expert-size", type=int, metavar="M", help="split: each expert's width (default: the largest that fits)"
    )
    parser.add_argument(
        "--shared-fraction",
        type=fraction,
        default=2 / 3,
        help="split: share of each expert copied from the common first neurons (default 2/3)",
    )
    parser.add_argument(
        "--gate",
        choices=GATES,
        help="router init (default normal(0, initializer_range)); zeros with upcycle: exactly the dense function,"
        " but every token ties on expert 0 at the start",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds a normal router and the calibration windows")
    parser.add_argument("--calib", metavar="SPLIT", help="split: order FFN neurons by importance on e.g. DATA/train")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--calib-windows", type=int, default=256, help="calibration windows (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward (default 8)")
    parser.add_argument("--device", default="cpu", help="device for the calibration forwards (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)

    try:
        record = moefy(
            args.dense,
            args.out,
            num_experts=args.experts,
            mode=args.mode,
            top_k=args.top_k,
            expert_size=args.expert_size,
            shared_fraction=args.shared_fraction,
            gate=args.gate,
            seed=args.seed,
            calib=args.calib,
            seq_len=args.seq_len,
            calib_windows=args.calib_windows,
            batch_size=args.batch_size,
            device=args.device,
            overwrite=args.overwrite,
        )
    except (MoefyError, DataError, FileNotFoundError) as e:
        print(f"moefy: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
