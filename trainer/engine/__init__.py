"""Backends: how the model is wrapped, stepped and saved (DDP, DeepSpeed), and the
precision policy both follow."""
