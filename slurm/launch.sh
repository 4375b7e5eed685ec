# shellcheck shell=bash
# The launch logic of minima's sbatch scripts (slurm/distill_3b.sh; a chat-stage script sources the same): sourced,
# not run. One call does everything:
#
#   minima_launch MODULE DEFAULT_RECIPE DEFAULT_RUN_DIR [RECIPE] [key=value ...]
#
# It reads SLURM's environment (nodes, GPUs, master address and port), starts `python -m MODULE RECIPE
# run.out_dir=RUN_DIR key=value ...` on every node without SSH between nodes, prints what it starts, and requeues the
# job when the run stopped early with a checkpoint (time limit, pre-emption). Variables, all optional:
#
#   LAUNCHER=srun       srun starts every rank (one task per GPU); minima.ranks reads them from SLURM_PROCID,
#                       SLURM_LOCALID, SLURM_STEP_NUM_TASKS, ... (see minima/ranks.py)
#   LAUNCHER=torchrun   srun starts one torchrun per node (--nnodes N --node_rank $SLURM_NODEID), which starts its
#                       GPUs' ranks
#   RECIPE, RUN_DIR     the recipe and run directory (a first argument without '=' is the recipe; an argument
#                       run.out_dir=DIR is the run directory)
#   GPUS_PER_NODE       ranks per node (default: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, SLURM_NTASKS_PER_NODE, 1)
#   MASTER_ADDR         default: the first host of SLURM_JOB_NODELIST
#   MASTER_PORT         default: 10000 + SLURM_JOB_ID % 20000 (minima.ranks.slurm_master_port derives the same)
#   SIGNAL_LEAD=600     seconds; keep equal to the @ of the script's `#SBATCH --signal=B:USR1@...`. torchrun's
#                       --shutdown_timeout (how long it waits for signalled workers before SIGKILL) is set to it.
#   PYTHON=python       the interpreter with minima installed (activate its virtualenv before sbatch: sbatch
#                       exports the submitting shell's environment to the job)
#   REQUEUE=1           0: never requeue, only report the stop
#   DRY_RUN=1           print the command of every task (srun) or node (torchrun) and exit 0; works outside SLURM
#                       with a fake environment (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE, ...)
#
# Stop and requeue (the contract with minima.distill): minima stops gracefully when <run.out_dir>/STOP exists (checked
# at every optimizer step) or a rank gets SIGUSR1/SIGTERM/SIGINT/SIGHUP: it finishes the step, saves a checkpoint,
# writes <run.out_dir>/stopped.json, removes STOP and exits with status 75 (torchrun reports 1 instead). The batch
# shell gets `--signal=B:USR1@LEAD` LEAD seconds before the time limit and turns it into the STOP file, which works
# the same under both launchers; when srun has ended with 75 or a stopped.json, the job requeues itself
# (`scontrol requeue`) and the new start continues from the checkpoint (run.resume=auto, the recipes' default).
#
# Choosing the lead: the longest optimizer step + the checkpoint save time (minima logs "checkpoint ... saved in S s"
# and perf/checkpoint_save_s) + a margin of a few minutes (the first steps after a resume are slower, a busy
# filesystem saves more slowly); Slurm may send the signal up to 60 s early, never late. At the time limit itself
# Slurm sends SIGTERM and, KillWait seconds later (a site setting, often 30 s; `scontrol show config | grep
# KillWait`), SIGKILL: far less than a 7B -> 3B step plus a ~48 GB ZeRO checkpoint, which is why the stop must start
# LEAD seconds earlier. Scancel and pre-emption send SIGTERM too (pre-emption after the site's GraceTime); the run
# saves the same way, a cancelled job is not requeued and a pre-empted --requeue job is requeued by Slurm itself.
#
# NCCL and network settings are site-specific; export them before sbatch (or in your site's wrapper), e.g.
#   export NCCL_SOCKET_IFNAME=ib0            # the interface for NCCL's bootstrap and socket transport
#   export GLOO_SOCKET_IFNAME=ib0            # the same for gloo (CPU collectives)
#   export NCCL_IB_HCA=mlx5                  # which InfiniBand adapters NCCL uses
#   export NCCL_DEBUG=WARN                   # INFO to see the transports NCCL picked
#   export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 # a failed collective ends the rank instead of hanging
#   export FI_PROVIDER=efa                   # libfabric provider (AWS EFA) with the aws-ofi-nccl plugin
# Never CUDA_LAUNCH_BLOCKING (it serialises every kernel launch: a debugging switch, not a setting).

MINIMA_REQUEUE_STATUS=75 # minima.distill.EXIT_REQUEUE

minima_die() {
	echo "minima: $*" >&2
	exit 2
}

# One host a line, as `scontrol show hostnames` prints them; minima's own expansion where there is no scontrol.
minima_hostnames() {
	if command -v scontrol >/dev/null 2>&1; then
		scontrol show hostnames "$1"
	else
		"$PYTHON" -m minima.ranks hostnames "$1"
	fi
}

# Words as a shell reads them back (single quotes where needed): what is printed can be pasted.
minima_quote() {
	local word out=() q="'"
	for word in "$@"; do
		if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
			out+=("$word")
		else
			out+=("'${word//$q/$q\\$q$q}'")
		fi
	done
	echo "${out[*]}"
}

# The batch shell's USR1 (the time-limit warning) or TERM (pre-emption, scancel): ask the run to stop at its next
# optimizer step. Launcher-agnostic: every rank learns it from the main rank at the step boundary.
minima_request_stop() {
	echo "minima: batch shell got SIG$1: creating $MINIMA_RUN_DIR/STOP (the run saves a checkpoint and stops)" >&2
	# Never fail here: under `set -e` a failing trap would end the batch shell and leave srun unattended.
	touch "$MINIMA_RUN_DIR/STOP" || echo "minima: cannot create $MINIMA_RUN_DIR/STOP" >&2
}

minima_launch() {
	local module=$1 recipe=${RECIPE:-$2} run_dir=${RUN_DIR:-$3}
	shift 3
	if [[ $# -gt 0 && $1 != *=* ]]; then
		recipe=$1
		shift
	fi
	local -a overrides=()
	local arg
	for arg in "$@"; do
		case $arg in
		run.out_dir=*) run_dir=${arg#run.out_dir=} ;;
		*) overrides+=("$arg") ;;
		esac
	done
	local dry_run=${DRY_RUN:-0} launcher=${LAUNCHER:-srun} lead=${SIGNAL_LEAD:-600}
	PYTHON=${PYTHON:-python}
	if [[ -z ${SLURM_JOB_ID:-} && $dry_run != 1 ]]; then
		minima_die "not inside a SLURM job (SLURM_JOB_ID is not set): submit it with 'sbatch $0 [RECIPE]" \
			"[key=value ...]' (or run it inside salloc); DRY_RUN=1 prints the commands it would launch"
	fi
	[[ $launcher == srun || $launcher == torchrun ]] || minima_die "LAUNCHER=$launcher: expected srun or torchrun"
	[[ $lead =~ ^[0-9]+$ ]] || minima_die "SIGNAL_LEAD=$lead: expected seconds"

	# The allocation: hosts in order, ranks per node, the rendezvous address.
	local job_id=${SLURM_JOB_ID:-0} nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-localhost}}
	local -a hosts
	mapfile -t hosts < <(minima_hostnames "$nodelist")
	[[ ${#hosts[@]} -gt 0 ]] || minima_die "cannot expand the node list '$nodelist'"
	local nnodes=${#hosts[@]}
	local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}}
	gpus=${gpus##*:}   # SLURM_GPUS_PER_NODE may name the type (a100:8)
	gpus=${gpus%%\(*}  # SLURM_NTASKS_PER_NODE may read 8(x2)
	[[ $gpus =~ ^[1-9][0-9]*$ ]] || minima_die "cannot tell the GPUs per node ('$gpus'): set GPUS_PER_NODE"
	MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
	if [[ -z ${MASTER_PORT:-} ]]; then
		MASTER_PORT=29500
		if [[ $job_id =~ ^[0-9]+$ ]]; then MASTER_PORT=$((10000 + job_id % 20000)); fi
	fi
	export MASTER_ADDR MASTER_PORT

	local -a program launch
	program=("$PYTHON" -m "$module" "$recipe" "run.out_dir=$run_dir" "${overrides[@]}")
	if [[ $launcher == srun ]]; then
		launch=(srun --nodes="$nnodes" --ntasks=$((nnodes * gpus)) --ntasks-per-node="$gpus" --kill-on-bad-exit=1)
		# Recent Slurm releases do not pass sbatch's --cpus-per-task on to srun by themselves.
		if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then launch+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
		launch+=("${program[@]}")
	else
		# One torchrun per node with all of the node's CPUs; torchrun forwards SIGUSR1 only when told to, and waits
		# --shutdown_timeout seconds for signalled workers to save before it kills them.
		local -a node_program=("$PYTHON" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$gpus")
		node_program+=(--master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
		node_program+=("--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown_timeout="$lead")
		node_program+=(-m "$module" "$recipe" "run.out_dir=$run_dir" "${overrides[@]}")
		launch=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
		if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then launch+=(--cpus-per-task="$SLURM_CPUS_ON_NODE"); fi
		# The node rank is known only on the node: each task's shell inserts its SLURM_NODEID after the launcher.
		# shellcheck disable=SC2016  # expanded by that shell, not this one
		launch+=(bash -c 'exec "${@:1:3}" --node_rank="$SLURM_NODEID" "${@:4}"' minima-node "${node_program[@]}")
	fi

	echo "minima: job $job_id: $nnodes node(s) (${hosts[*]}), $gpus rank(s) per node," \
		"master $MASTER_ADDR:$MASTER_PORT, launcher $launcher, run directory $run_dir"
	echo "minima: launching: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT $(minima_quote "${launch[@]}")"
	if [[ $dry_run == 1 ]]; then
		local node local_rank
		local -a task_env
		for ((node = 0; node < nnodes; node++)); do
			if [[ $launcher == srun ]]; then
				for ((local_rank = 0; local_rank < gpus; local_rank++)); do
					# What srun gives the task, from which minima.ranks derives RANK, WORLD_SIZE, LOCAL_RANK.
					task_env=("SLURM_PROCID=$((node * gpus + local_rank))" "SLURM_LOCALID=$local_rank")
					task_env+=("SLURM_NODEID=$node")
					task_env+=(SLURM_STEP_NUM_TASKS=$((nnodes * gpus)) "SLURM_STEP_TASKS_PER_NODE=$gpus(x$nnodes)")
					task_env+=("SLURM_STEP_NODELIST=$nodelist" "SLURM_JOB_ID=$job_id")
					task_env+=("MASTER_ADDR=$MASTER_ADDR" "MASTER_PORT=$MASTER_PORT")
					echo "minima: task $((node * gpus + local_rank)) on ${hosts[node]}:" \
						"$(minima_quote "${task_env[@]}" "${program[@]}")"
				done
			else
				echo "minima: node $node on ${hosts[node]}: $(minima_quote "${node_program[@]:0:3}")" \
					"--node_rank=$node $(minima_quote "${node_program[@]:3}")"
			fi
		done
		echo "minima: DRY_RUN=1: nothing launched"
		return 0
	fi

	# A stale request or record of an earlier start would stop (or requeue) this one at once.
	MINIMA_RUN_DIR=$run_dir
	mkdir -p "$run_dir"
	rm -f "$run_dir/STOP" "$run_dir/stopped.json"
	trap 'minima_request_stop USR1' USR1
	trap 'minima_request_stop TERM' TERM
	# srun in the background: bash runs a trap only between commands, and `wait` returns early for one.
	"${launch[@]}" &
	local pid=$! status
	while :; do
		wait "$pid" && status=0 || status=$?
		kill -0 "$pid" 2>/dev/null || break # a trapped signal ended the wait, not srun: keep waiting
	done
	trap - USR1 TERM

	# Removed before the start (and by minima when it starts): a stopped.json now is this start's record.
	if [[ $status -ne $MINIMA_REQUEUE_STATUS && ! -f $run_dir/stopped.json ]]; then
		echo "minima: srun exited with status $status"
		return "$status"
	fi
	echo "minima: the run stopped with a checkpoint (srun status $status):" \
		"$(tr -d '\n' 2>/dev/null <"$run_dir/stopped.json")"
	if [[ ${REQUEUE:-1} != 1 ]]; then
		echo "minima: REQUEUE=${REQUEUE}: not requeued; submit the same command again to continue"
		return "$MINIMA_REQUEUE_STATUS"
	fi
	# scancel also sends TERM (and the run saves); a cancelled job must stay cancelled.
	if scontrol show job "$job_id" 2>/dev/null | grep -q 'JobState=CANCELLED'; then
		echo "minima: job $job_id was cancelled: not requeued; submit the same command again to continue"
		return "$MINIMA_REQUEUE_STATUS"
	fi
	echo "minima: requeueing: scontrol requeue $job_id (the next start resumes with run.resume=auto)"
	if ! scontrol requeue "$job_id"; then
		echo "minima: scontrol requeue failed (is the job requeueable? sbatch --requeue);" \
			"submit the same command again to continue" >&2
		return "$MINIMA_REQUEUE_STATUS"
	fi
	return 0
}
