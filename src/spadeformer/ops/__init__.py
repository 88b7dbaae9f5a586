"""Parameter-free functions: fast kernels and their `_ref` twins."""

from spadeformer.ops.fftconv import (
    fast_fft_length,
    fft_conv,
    fft_conv_ref,
    fft_conv_spectrum,
    kernel_spectrum,
)
from spadeformer.ops.flex_attn import flex_local_attention
from spadeformer.ops.local_attn import (
    attention_ref,
    chunk_attention,
    full_attention,
    local_attention,
    sliding_window_attention,
)
from spadeformer.ops.position_bias import (
    ShawRelativeBias,
    SimpleRelativeBias,
    T5RelativeBias,
    t5_relative_bucket,
)
from spadeformer.ops.scan import associative_scan, associative_scan_ref
from spadeformer.ops.ssm_kernels import (
    discretize_bilinear,
    hippo_legs,
    hippo_legs_normal,
    hippo_legs_nplr,
    s4_kernel,
    ssm_kernel_ref,
)
from spadeformer.ops.vandermonde import (
    decay_kernel,
    decay_kernel_ref,
    vandermonde_kernel,
    vandermonde_kernel_ref,
)

__all__ = [
    "ShawRelativeBias",
    "SimpleRelativeBias",
    "T5RelativeBias",
    "associative_scan",
    "associative_scan_ref",
    "attention_ref",
    "chunk_attention",
    "decay_kernel",
    "decay_kernel_ref",
    "discretize_bilinear",
    "fast_fft_length",
    "fft_conv",
    "fft_conv_ref",
    "fft_conv_spectrum",
    "flex_local_attention",
    "kernel_spectrum",
    "full_attention",
    "hippo_legs",
    "hippo_legs_normal",
    "hippo_legs_nplr",
    "local_attention",
    "s4_kernel",
    "sliding_window_attention",
    "ssm_kernel_ref",
    "t5_relative_bucket",
    "vandermonde_kernel",
    "vandermonde_kernel_ref",
]
