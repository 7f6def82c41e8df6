#!/bin/bash
#SBATCH -o slurm-%%j.out
#SBATCH -e slurm-%%j.err
#SBATCH --nodes=%(nodes)d
#SBATCH --ntasks-per-node=%(tasks_per_node)d
#SBATCH --mem-per-cpu=%(mem)dM
#SBATCH --time=%(wt_hours)02d:%(wt_minutes)02d:%(wt_seconds)02d
#SBATCH --job-name=%(job_name)s

# Job %(ui_job_id)s of the seed-style test portal, run by Slurm.
echo "job name: $SLURM_JOB_NAME"
echo "memory per cpu: $SLURM_MEM_PER_CPU"
echo "time limit: $(squeue -h -j "$SLURM_JOB_ID" -o %%l)"
cp "%(parameter_file)s" result.txt
