"""PyTorch <-> Flax weight conversion for EfficientNetV2 (`python -m convert --help`)."""
