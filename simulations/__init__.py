"""Laptop simulation of an edgefl federation on Flower's simulation engine."""
