"""Evaluation: the MinD-Vis n-way protocol, identification, pairwise and NSD-style metrics, reports."""
