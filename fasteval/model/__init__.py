"""Stage 2: the model: torchvision architectures, checkpoints, compiled inference and its cache."""
