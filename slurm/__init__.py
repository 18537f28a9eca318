"""ldot.slurm: the policy of the Slurm scripts in this folder (argument parsing, expansion of the site's
roots, checks, names, the requeue decision, a job array's parent run), called by them as
`python -m ldot.slurm VERB` (see __main__.py). The bash side keeps only what must run in the batch
shell: the site file, modules, srun, signal traps and `scontrol requeue`."""
