"""torchgraft.quant: frozen quantised bases for QLoRA (NF4, int8 weight-only), plugged in as converters."""
from torchgraft.quant.base import QuantizedLinear, require_torchao
from torchgraft.quant.converters import dequantize_model, quantize_linears
from torchgraft.quant.formats import quantizer
from torchgraft.quant.load import LoadReport, load_quantized

__all__ = ["LoadReport", "QuantizedLinear", "load_quantized", "dequantize_model", "quantize_linears", "quantizer", "require_torchao"]
