"""shapes-sd's recipe: train the CLIP, VAE and UNet on the procedural world, build the diffusers folder.

``scripts/train_shapes_sd.sh`` runs every stage in order; the world, the renderer and the judge it uses are
the package's (``jax_erasepro.shapes``), and so is the diffusion loss (``jax_erasepro.diffusion``).
"""
