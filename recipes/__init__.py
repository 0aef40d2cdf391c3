"""Training recipes for the models the package ships; beside the package, not installed with it.

Run from the repository root, e.g. ``python -m recipes.shapes_sd.train_unet --help``.
"""
