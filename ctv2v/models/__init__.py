"""The networks and their artifacts: VAEs, denoiser, diffusion process, the wired model."""
