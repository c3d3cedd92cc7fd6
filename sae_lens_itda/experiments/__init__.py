"""Workflows that produce tables and plots from the parts above (ITDA vs SAE comparison)."""
