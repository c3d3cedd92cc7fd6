"""Scoring dictionaries: held-out reconstruction with and without sinks, CE-loss and KL scores
with the dictionary spliced in, and SAEBench."""
