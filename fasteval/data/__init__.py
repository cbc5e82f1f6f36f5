"""Stage 1: the samples and the loaders that decode and preprocess them."""
