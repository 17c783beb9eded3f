"""Networks: the masked brain model (stage A) and the double-conditioned latent diffusion model (stage B); the
folder one model is saved in (``folder``) and the reader of the original stage-A checkpoint files
(``mbm_original``)."""
