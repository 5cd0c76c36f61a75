"""Pretraining: data pipeline, train step, optimizer."""
