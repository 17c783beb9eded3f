"""Converters from the original MinD-Vis / CompVis checkpoints to mindvis folders (explicit key maps)."""
