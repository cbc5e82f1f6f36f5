"""fasteval: exact, fast evaluation of image classifiers on ImageFolder datasets."""

__version__ = "0.1.0"
