"""Scoring samples against real images: feature spaces and the distances between feature sets."""
