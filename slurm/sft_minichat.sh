#!/usr/bin/env bash
# MiniChat's instruction tuning of the distilled 3B student (recipe minichat_3b) on a SLURM cluster: the same job and
# launch logic as slurm/distill_3b.sh (slurm/launch.sh), over conversations prepared by tools/prepare_chat.py. From the
# minima checkout, with minima's virtualenv active:
#
#   sbatch slurm/sft_minichat.sh student.path=/ckpt/minima-3b/export data.dir=/data/minichat run.out_dir=/ckpt/minichat-3b
#   sbatch slurm/sft_minichat.sh ... teacher.path=/models/chat-7b kd.ce_weight=0.5 kd.kd_weight=0.5   # with KD
#   DRY_RUN=1 SLURM_JOB_NODELIST='gpu01' SLURM_GPUS_ON_NODE=8 bash slurm/sft_minichat.sh ...            # print only
#
# Arguments: [RECIPE] [key=value ...] (minima.sft overrides). Variables as in slurm/distill_3b.sh: RECIPE
# (minichat_3b), RUN_DIR (runs/minichat_3b, or the run.out_dir=... argument), LAUNCHER (srun | torchrun),
# GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, SIGNAL_LEAD, PYTHON, REQUEUE, DRY_RUN (slurm/launch.sh).
#
# The header: one node of 8 GPUs (MiniChat's setting), one task per GPU for LAUNCHER=srun; USR1 300 s before the
# time limit (a step and a ZeRO checkpoint of the 3B student); requeue and one appended log across requeues.
#SBATCH --job-name=minichat-3b
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
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

SIGNAL_LEAD=${SIGNAL_LEAD:-300} # the --signal lead above
minima_launch minima.sft minichat_3b runs/minichat_3b "$@"
