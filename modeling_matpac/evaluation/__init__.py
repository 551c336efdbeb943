"""Evaluating MATPAC embeddings: the downstream tasks, embedding extraction, the linear probe, its report and HEAR."""
