"""Weight quantization: bit packing, the generic QuantizedWeight format, RTN, QuantLinear, bitsandbytes."""
from .linear import (
    QuantLinear,
    find_linears,
    quantize_model_rtn,
    replace_with_quantized,
)
from .memory_accounting import module_bytes
from .packing import pack_bits, packed_size, unpack_bits
from .rtn import QuantizedWeight, fake_quantize, quantize_rtn, relative_error

__all__ = [
    "QuantLinear", "QuantizedWeight", "fake_quantize", "find_linears", "module_bytes", "pack_bits", "packed_size",
    "quantize_model_rtn", "quantize_rtn", "relative_error", "replace_with_quantized", "unpack_bits",
]
