"""Concept folders, DreamBench, and the on-device caches the train step reads."""
