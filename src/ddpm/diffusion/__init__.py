"""The diffusion process itself: schedules, the forward process and training objective, the samplers."""
