"""The TFLite converter's full-integer quantization of bench/actquant.py's Digits CNN (run in
bench/.venv-tflite: `make bench-venv-tflite`; actquant.py calls it, no torch needed here).

    bench/.venv-tflite/bin/python bench/tflite_peer.py IN.npz OUT_DIR

IN.npz holds the trained fp32 torch weights (conv / BatchNorm / linear, torch layouts), the
calibration images and the test images (NCHW). The same network is rebuilt in Keras (NHWC: conv
kernels as HWIO, torch's padding=1 stride-2 conv as ZeroPadding2D + VALID, the first Linear's
columns permuted from torch's C·H·W flatten order to Keras' H·W·C), checked against the torch fp32
logits, then converted with `TFLiteConverter` (Optimize.DEFAULT, the calibration images as the
representative dataset, TFLITE_BUILTINS_INT8: int8 weights and activations, float input / output
like lowbit's file). Writes OUT_DIR/tf_fp32.tflite and OUT_DIR/tf_int8.tflite and prints a JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def keras_digits(w: dict) -> tf.keras.Model:
    L = tf.keras.layers
    eps = float(w["bn_eps"])
    x = inp = L.Input((8, 8, 1), name="x")
    x = L.Conv2D(32, 3, padding="same", name="conv1")(x)
    x = L.BatchNormalization(epsilon=eps, name="bn1")(x)
    x = L.ReLU()(x)
    x = L.ZeroPadding2D(1)(x)
    x = L.Conv2D(64, 3, strides=2, padding="valid", name="conv2")(x)
    x = L.BatchNormalization(epsilon=eps, name="bn2")(x)
    x = L.ReLU()(x)
    x = L.Flatten()(x)
    x = L.Dense(128, activation="relu", name="fc1")(x)
    x = L.Dense(10, name="fc2")(x)
    m = tf.keras.Model(inp, x)
    hwio = lambda k: np.transpose(k, (2, 3, 1, 0))  # noqa: E731 - torch OIHW -> Keras HWIO
    m.get_layer("conv1").set_weights([hwio(w["0.weight"]), w["0.bias"]])
    m.get_layer("conv2").set_weights([hwio(w["3.weight"]), w["3.bias"]])
    for name, i in (("bn1", 1), ("bn2", 4)):
        m.get_layer(name).set_weights([w[f"{i}.weight"], w[f"{i}.bias"], w[f"{i}.running_mean"],
                                       w[f"{i}.running_var"]])
    fc1 = w["7.weight"].reshape(128, 64, 4, 4).transpose(0, 2, 3, 1).reshape(128, -1)  # C·H·W -> H·W·C columns
    m.get_layer("fc1").set_weights([fc1.T, w["7.bias"]])
    m.get_layer("fc2").set_weights([w["9.weight"].T, w["9.bias"]])
    return m


def main() -> None:
    data = dict(np.load(sys.argv[1]))
    out = Path(sys.argv[2])
    nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    calib, xte = nhwc(data["calib"]), nhwc(data["xte"])
    model = keras_digits(data)
    keras_logits = model.predict(xte, verbose=0)
    fp32_gap = float(np.abs(keras_logits - data["fp32_logits"]).max())

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    (out / "tf_fp32.tflite").write_bytes(conv.convert())

    def representative():
        for i in range(0, len(calib), 1):
            yield [calib[i:i + 1]]

    t0 = time.time()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    (out / "tf_int8.tflite").write_bytes(conv.convert())
    print(json.dumps({"tensorflow": tf.__version__, "keras_vs_torch_fp32_max_abs": fp32_gap,
                      "convert_seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
