"""Quantization-aware training: prepare (fake quant, LSQ), train, convert (the real kernels).

    model = prepare_qat(model, QATConfig(qat_scheme("w4a8")), init=ptq_records, calib=batches)
    ... train (your loop, or lowbit.qat.trainer.train) ...
    records = convert_qat(model)
"""

from lowbit.qat.config import QATConfig, qat_scheme
from lowbit.qat.convert import convert_qat
from lowbit.qat.prepare import prepare_qat, qat_layers, qat_parameters

__all__ = ["QATConfig", "convert_qat", "prepare_qat", "qat_layers", "qat_parameters", "qat_scheme"]
