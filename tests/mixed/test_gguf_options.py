"""Mixed precision over GGUF types (2-block random Llama: 128-wide rows, down_proj 256-wide): each
layer gets the types llama.cpp can store for its shape at their exact bits per weight, the plan
is written as GGUF with those per-tensor types, bit for bit."""

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.export.gguf_blocks import LAYOUTS, encode
from lowbit.mixed.allocate import allocate, measurement_layers
from lowbit.mixed.apply import plan_recipe
from lowbit.mixed.measure import measure
from lowbit.mixed.options import gguf_options

TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q5_0", "Q6_K", "Q8_0")


def test_gguf_options_are_the_types_with_their_exact_bits():
    opts = {o.name: o for o in gguf_options(TYPES)}
    assert opts["Q2_K"].bits_per_weight == 2.625 and opts["Q3_K"].bits_per_weight == 3.4375
    assert opts["Q4_0"].bits_per_weight == 4.5 and opts["Q6_K"].bits_per_weight == 6.5625
    assert all(o.spec == LAYOUTS[n].spec for n, o in opts.items())
    assert not opts["Q3_K"].fits(576) and opts["Q3_K"].fits(1536) and opts["Q4_0"].fits(576)
    with pytest.raises(LowbitError, match="IQ4_NL: choose from Q8_0"):
        gguf_options(("Q4_0", "IQ4_NL"))


@pytest.fixture(scope="module")
def gguf_measured(tiny_dir, tmp_path_factory):
    from lowbit.models import load_model

    model, _ = load_model(tiny_dir)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 49152, (4, 64), generator=g)
    sens = torch.randint(0, 49152, (2, 32), generator=g)
    path = tmp_path_factory.mktemp("gmeas") / "m.json"
    meas = measure(model, calib, sens, options=gguf_options(TYPES), path=path, progress=False)
    return meas, path, (model, calib, sens)


def test_each_layer_gets_what_llamacpp_stores_for_its_shape(gguf_measured):
    meas, _, _ = gguf_measured
    for name, layer in meas.layers.items():
        k = layer["in_features"] % 256 == 0
        assert set(layer["bits"]) == ({"Q2_K", "Q3_K", "Q6_K"} if k else set()) | {"Q4_0", "Q5_0", "Q8_0"}, name
        for t, bits in layer["bits"].items():
            assert bits == layer["params"] * LAYOUTS[t].nbytes * 8 // LAYOUTS[t].block
        assert layer["sensitivity"] > 0
        for t in layer["bits"]:
            assert meas.cost(name, t) == pytest.approx(layer["sensitivity"] * layer["error"][t])
    assert any(layer["in_features"] == 256 for layer in meas.layers.values())


def test_plan_written_as_gguf_with_the_planned_types(gguf_measured, tiny_dir, tmp_path):
    import gguf

    from lowbit.export import gguf as G
    from lowbit.export.gguf_meta import name_map
    from lowbit.export.model import QuantizedModel
    from lowbit.methods import get_method
    from lowbit.models import load_model
    from lowbit.pipeline import quantize_model

    meas, _, (_, calib, _) = gguf_measured
    plan = allocate(measurement_layers(meas), 4.4)
    assert {"Q2_K", "Q3_K"} & set(plan.choices.values()) and len(set(plan.choices.values())) > 1
    model, tok = load_model(tiny_dir)
    records = quantize_model(model, plan_recipe(plan, meas), get_method("gptq"), calib, progress=False)
    qm = QuantizedModel.from_model(model, tok, records, method="gptq", source="tiny")
    out = G.write(qm, tmp_path / "mixed.gguf", output_type="F16")  # F16 embedding: fast
    names = name_map(model.config)
    stored = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    bits = 0
    for hf, t in plan.choices.items():
        tensor = stored[names[hf] + ".weight"]
        assert tensor.tensor_type.name == t
        bits += int(tensor.n_bytes) * 8
    assert bits == plan.bits <= 4.4 * plan.params
    for hf, qw in records.items():  # the stored bytes are the records' blocks (rope rows permuted), bit for bit
        t = plan.choices[hf]
        data = np.asarray(stored[names[hf] + ".weight"].data).reshape(-1)
        assert np.array_equal(data, encode(G._permuted(qm.config, hf, qw), LAYOUTS[t]).reshape(-1))
