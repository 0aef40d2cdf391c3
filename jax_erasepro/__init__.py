"""jax-erasepro: concept erasure for Stable-Diffusion-family models in pure JAX."""
