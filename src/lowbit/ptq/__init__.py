"""Weight + activation post-training quantization for any nn.Module:

    from lowbit import ptq
    model = ptq.prepare(model, ptq.ptq_config("w8a8-static", observer="percentile"))
    ptq.calibrate(model, batches)      # static schemes: observers see the inputs
    model = ptq.convert(model)         # Int8Linear / Int8Conv2d in place of Linear / Conv2d
    ptq.save(model, "out/cnn-int8");  model = ptq.load(float_model, "out/cnn-int8")

LLMs: `smoothquant.smooth` before prepare; `llm.quantize_llm` runs the whole path (and W4A8).
"""

from lowbit.ptq.calibrate import calibrate
from lowbit.ptq.config import PTQConfig, ptq_config
from lowbit.ptq.convert import convert
from lowbit.ptq.prepare import prepare
from lowbit.ptq.serialize import load, save

__all__ = ["PTQConfig", "calibrate", "convert", "load", "prepare", "ptq_config", "save"]
