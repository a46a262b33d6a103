"""Whole-volume evaluation, metrics, interpolation baselines, reports, comparison, panels."""
