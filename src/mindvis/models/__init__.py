"""Networks: the masked brain model (stage A) and the double-conditioned latent diffusion model (stage B)."""
