"""GenQ core library: synthetic calibration data and low-bit post-training quantization."""

__version__ = "0.1.0"
