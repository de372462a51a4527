"""Training: the runtime, the step, the loop, the run directory and its writer, resume and stopping."""
