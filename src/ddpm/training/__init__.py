"""Training: the loop and its setup, the step and what it runs as, the cadence of a run, its stopping and
scoring, what it says; rundir/ holds what it keeps on disk."""
