"""Comparing representations: ITDA Jaccard similarity and the activation-based baselines, and
layer matching between models."""
