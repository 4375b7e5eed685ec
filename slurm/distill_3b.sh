#!/usr/bin/env bash
# MiniMA's distillation of LLaMA-2-7B into a 3B student (recipe llama2_7b_to_3b) on a SLURM cluster. From the minima
# checkout, with minima's virtualenv active (the job inherits the submitting shell's environment):
#
#   sbatch slurm/distill_3b.sh teacher.path=/models/Llama-2-7b-hf student='{path: /ckpt/minima-3b-init}' \
#       data.dir=/data/minima-pretrain data.sources='{pile: 0.6, github: 0.1, wudao: 0.3}' run.out_dir=/ckpt/minima-3b
#   sbatch --nodes=4 --time=48:00:00 --partition=gpu slurm/distill_3b.sh ...       # any header line, overridden
#   LAUNCHER=torchrun sbatch slurm/distill_3b.sh ...                                # one torchrun per node
#   DRY_RUN=1 SLURM_JOB_NODELIST='gpu[01-02]' SLURM_GPUS_ON_NODE=8 bash slurm/distill_3b.sh ...  # print only
#
# Arguments: [RECIPE] [key=value ...] (minima.distill overrides). Variables: RECIPE (llama2_7b_to_3b), RUN_DIR
# (runs/llama2_7b_to_3b, or the run.out_dir=... argument), LAUNCHER (srun | torchrun), GPUS_PER_NODE, MASTER_ADDR,
# MASTER_PORT, SIGNAL_LEAD, PYTHON, REQUEUE, DRY_RUN; slurm/launch.sh says what each does, what happens at the time
# limit (STOP file, checkpoint, `scontrol requeue`, resume) and which NCCL variables a site may need.
#
# The header: 2 nodes of 8 GPUs (16 A100s, MiniMA's setting), one task per GPU for LAUNCHER=srun. --signal sends the
# batch shell USR1 600 s before the time limit: enough for a 7B -> 3B step plus a ZeRO checkpoint of the 3B student
# (~48 GB) on a parallel filesystem; measure yours in the log ("checkpoint ... saved in S s") and keep SIGNAL_LEAD
# equal to it. --requeue lets the job requeue itself; --open-mode=append keeps one log across requeues.
#SBATCH --job-name=minima-3b
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail

# sbatch runs a copy of this file from its spool directory: then the checkout is where the job was submitted from.
MINIMA_DIR=${MINIMA_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [[ ! -f $MINIMA_DIR/slurm/launch.sh ]]; then
	MINIMA_DIR=${SLURM_SUBMIT_DIR:-$PWD}
fi
if [[ ! -f $MINIMA_DIR/slurm/launch.sh ]]; then
	echo "minima: cannot find slurm/launch.sh: submit from the minima checkout or set MINIMA_DIR" >&2
	exit 2
fi
# shellcheck source=slurm/launch.sh
source "$MINIMA_DIR/slurm/launch.sh"

minima_launch minima.distill llama2_7b_to_3b runs/llama2_7b_to_3b "$@"
