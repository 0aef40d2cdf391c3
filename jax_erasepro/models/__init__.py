"""SD v1.x models in Flax NNX: param paths equal diffusers/transformers state-dict keys."""
