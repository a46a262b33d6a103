"""ctv2v: latent video-to-video diffusion for CT slice interpolation. The ML core; importable without kfp."""

__version__ = "0.1.0"
