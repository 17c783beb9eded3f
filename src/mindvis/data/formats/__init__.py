"""Readers of real fMRI dataset formats (GOD, BOLD5000, HCP, NSD, NIfTI); import from the submodules."""
