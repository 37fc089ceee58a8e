"""Finetuning parts: training samples (data), and later the trainer."""
