"""Sweeps: lists of ``overfocus train`` runs, each in its own folder, and the launchers that run them (one after
another, in parallel on this machine's devices, or as a SLURM array through submitit).

    overfocus sweep run --config experiments/configs/regularizers_sweep.py --out sweeps/reg --launcher parallel
    overfocus sweep status sweeps/reg
    python -m overfocus_jax.dg.sweep --out sweeps/dg --launcher slurm --slurm-partition gpu ...

:mod:`.jobs` (a job and its markers), :mod:`.grid` (jobs from a config file's ``get_sweep()``), :mod:`.launchers`,
:mod:`.results` (what finished runs left), :mod:`.command` (the command line shared by every sweep command).
"""
