"""Bridges to the diffusers / CompVis / kohya world. Needs no torch unless a function says so."""
