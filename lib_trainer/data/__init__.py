"""Dataset side of training: folder scan, captions, prompt templates, images, latent cache."""
