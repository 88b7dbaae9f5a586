"""Parameter-free functions: fast kernels and their `_ref` twins."""

from spadeformer.ops.fftconv import fast_fft_length, fft_conv, fft_conv_ref

__all__ = ["fast_fft_length", "fft_conv", "fft_conv_ref"]
