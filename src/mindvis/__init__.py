"""mindvis: MinD-Vis (Chen et al., CVPR 2023) — seeing what a person saw, decoded from fMRI.

Stage A, Sparse-Coded Masked Brain Modeling, pretrains a 1-D ViT masked autoencoder on fMRI voxel patches.
Stage B, the Double-Conditioned Latent Diffusion Model, conditions a latent diffusion model on that
embedding through cross-attention and the time embedding.
"""

__version__ = "0.1.0"
