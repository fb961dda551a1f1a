"""int8 dynamic quantisation of an exported ONNX model for CPU inference (onnxruntime's quantiser).

Weights of MatMul / Gemm (and Conv where the CPU has a kernel) become int8 with per-tensor scales;
activations are quantised on the fly at run time. Smaller file, usually faster matmuls on CPU, and a
small accuracy change (`torchgraft export --quantize int8 --check` prints it; benchmarks/bench_export.py
measures accuracy and speed). The torchgraft metadata of the source file is kept.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from torchgraft.errors import ConfigError

# Conv is left in fp32: onnxruntime's dynamic ConvInteger has no fast CPU kernel (it is slower than
# fp32 Conv), while MatMul/Gemm/attention weights dominate the transformers and LeNet's fc layers.
QUANT_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "GRU")


def quantize_int8(src: str | Path, dst: str | Path, *, per_channel: bool = False) -> Path:
    """Write an int8 dynamically quantised copy of the ONNX file `src` to `dst`; returns `dst`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConfigError(f"{src} does not exist; export the model first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        out = tmp / dst.name
        external = (src.parent / (src.name + ".data")).is_file()
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # the quantiser logs a pre-processing hint on the root logger
        try:
            quantize_dynamic(src, out, weight_type=QuantType.QInt8, per_channel=per_channel,
                             op_types_to_quantize=list(QUANT_OPS), use_external_data_format=external)
        finally:
            logging.disable(previous)
        model = onnx.load(str(out), load_external_data=False)
        source = onnx.load(str(src), load_external_data=False)
        keep = {p.key: p.value for p in model.metadata_props}
        for p in source.metadata_props:
            keep.setdefault(p.key, p.value)
        keep["torchgraft.quantization"] = "int8-dynamic"
        del model.metadata_props[:]
        for k, v in keep.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(out))
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == dst.name):  # data files first
            os.replace(f, dst.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
