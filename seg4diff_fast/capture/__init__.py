"""Diffusers attention processors that capture text-image attention, one adapter per model family."""
