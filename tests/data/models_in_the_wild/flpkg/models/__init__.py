from .cnn import SmallCNN  # noqa: F401  (the package exports its models, as most projects do)
