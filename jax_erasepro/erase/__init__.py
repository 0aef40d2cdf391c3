"""Concept erasure: closed-form weight edits and the plumbing that applies them to a model."""
