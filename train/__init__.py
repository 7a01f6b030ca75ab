"""Training for effnetv2-jax: `python -m train` (see train/config.py for every flag)."""
