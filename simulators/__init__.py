"""Simulated homes and care homes."""
