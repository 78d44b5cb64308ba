"""Data pipelines for recsys-moe: sources, transforms and dataset builders."""
