"""Parameter-free functions: fast kernels and their `_ref` twins."""

from spadeformer.ops.fftconv import fast_fft_length, fft_conv, fft_conv_ref

__all__ = ["fast_fft_length", "fft_conv", "fft_conv_ref"]
from spadeformer.ops.ssm_kernels import hippo_legs, hippo_legs_normal, hippo_legs_nplr

__all__ += ["hippo_legs", "hippo_legs_normal", "hippo_legs_nplr"]
