"""Pretraining and the training loop shared by SFT and DPO (see loop.py for the seams)."""
