#!/bin/bash
# kdzoo on several nodes under SLURM (README.md, "ImageNet and multi-node"): one srun task per node, each a torchrun
# that starts one kdzoo process per GPU; the nodes meet in a c10d rendezvous on the allocation's first node.
# Submit from the repository root, in the environment kdzoo is installed in (sbatch passes it on):
#   source .venv/bin/activate && sbatch examples/slurm_imagenet.sh
#
# Stop and requeue. 120 s before the time limit SLURM sends USR1 to this script (--signal=B:USR1@120), which passes
# it on to the job's tasks (scancel --signal=USR1 reaches every process of the job steps, not this script).
# kdzoo's stop handler (kdzoo/engine/stop.py: SIGTERM, SIGUSR1, SIGINT) stops all processes at the step they agree
# on, writes a checkpoint of that step and exits with 128 + the signal number; this script then requeues the job,
# and the rerun continues from that checkpoint (resume=auto). A SIGTERM that reaches each worker once (scancel
# --signal=TERM) stops the same way.
# The per-node wrapper makes torchrun ignore the stop signals and leave them to its workers (--signals-to-handle
# without SIGTERM and SIGINT): torchrun dies of USR1 by default, and forwarding TERM it hands every worker a
# second one, which kdzoo takes as "terminate at once", without the checkpoint. This assumes SLURM signals every
# process of a step (ProctrackType proctrack/cgroup or proctrack/linuxproc: `scontrol show config | grep Proctrack`).
# Where srun forwards a SIGTERM of its own (preemption, plain scancel) the workers may see it twice, so a planned
# stop should come through the USR1 warning.
#SBATCH --job-name=kdzoo-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_JOB_NUM_NODES nodes, rendezvous on $head_node"

stop_requested=0
forward_warning() {
  stop_requested=1
  scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap forward_warning USR1
trap 'stop_requested=1' TERM  # scancel / preemption: SLURM signals the tasks itself

# data.batch_size is per process: 2 nodes x 8 GPUs x 32 = 512, the recipe's global batch (schedule.reference_batch
# 512; another global batch scales the lr linearly). 10 loader workers per process fit the 96 CPUs of a node.
# --kill-on-bad-exit=0: a node whose processes stop first must not kill one still writing the checkpoint.
# --max-restarts 0: a stopped group exits (restarted, it would train on until the time limit); the requeue resumes.
srun --kill-on-bad-exit=0 bash -c 'trap "" USR1 TERM INT; exec "$@"' node \
  torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node 8 \
    --rdzv-backend c10d --rdzv-endpoint "$head_node:29500" --rdzv-id "$SLURM_JOB_ID" \
    --max-restarts 0 --signals-to-handle SIGHUP,SIGQUIT \
    -m kdzoo train configs/imagenet/dkd/ResNet34_ResNet18.yaml data.root=data/imagenet data.batch_size=32 \
    data.num_workers=10 resume=auto &
srun_pid=$!

# A trapped signal ends `wait` early while srun still runs: wait again until srun itself has exited.
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid"
done
wait "$srun_pid"
status=$?

if [ "$stop_requested" = 1 ] && [ "$status" -ne 0 ]; then
  echo "stopped with a checkpoint (srun exit $status): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
