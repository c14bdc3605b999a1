"""deepsigns: watermark neural networks and prove ownership later."""

__version__ = "0.1.0"
__all__ = ["__version__"]
