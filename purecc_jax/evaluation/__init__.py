"""Evaluation: DreamBench metrics (CLIP-I, CLIP-T, DINO) and the sampling sweep over trained workdirs."""
