"""A calibration state never runs code: planted pickles are refused, not loaded; the fingerprint
is checked from the safetensors header; state files are byte-identical for the same state."""

import builtins
import hashlib
import io
from pathlib import Path

import pytest
import torch

from lowbit.calibration.resume import load_state, save_state
from lowbit.core.quantize import quantize
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec

SRC = Path(__file__).resolve().parents[2] / "src"


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears iff the pickle was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _payload(marker: Path) -> bytes:
    """A state file as torch.save wrote them (a zipped pickle), carrying the code."""
    buf = io.BytesIO()
    torch.save({"block": 0, "fingerprint": "fp", "hidden": [], "evil": _CreatesFile(marker)}, buf)
    return buf.getvalue()


def test_the_payload_runs_code_when_unpickled(tmp_path):
    """The test below can fail: loading this payload the way the old code did creates the file."""
    marker = tmp_path / "pwned"
    (tmp_path / "state.pt").write_bytes(_payload(marker))
    torch.load(tmp_path / "state.pt", weights_only=False).pop("evil").close()
    assert marker.exists()


@pytest.mark.parametrize("name", ["calibration_state.pt", "block_0000.pt", "calibration_state.safetensors"])
def test_planted_pickle_is_refused_and_never_executed(tmp_path, name):
    state, marker = tmp_path / "state", tmp_path / "pwned"
    state.mkdir()
    (state / name).write_bytes(_payload(marker))
    with pytest.raises(LowbitError, match=name.replace(".", r"\.")):
        load_state(state, "fp")
    assert not marker.exists()


def _block():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    return {"model.layers.0.mlp.up_proj": quantize(W, QuantSpec(bits=3, group_size=32, symmetric=False))}


def test_state_round_trip_is_exact_and_files_are_deterministic(tmp_path):
    qweights = _block()
    hidden = [torch.randn(2, 4, 8).to(torch.bfloat16), torch.randn(2, 4, 8).to(torch.bfloat16)]
    errors = {"model.layers.0.mlp.up_proj": 0.012345678901234567, "b": 1e-7}
    for d in ("a", "b"):
        save_state(tmp_path / d, 0, "fp", qweights, hidden, errors)
    for f in ("block_0000.safetensors", "calibration_state.safetensors"):
        digests = {hashlib.sha256((tmp_path / d / f).read_bytes()).hexdigest() for d in ("a", "b")}
        assert len(digests) == 1, f
    state = load_state(tmp_path / "a", "fp")
    assert state["block"] == 0 and state["layer_errors"] == errors
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(state["hidden"], hidden))
    for name, qw in qweights.items():
        got = state["qweights"][name]
        assert got.spec == qw.spec
        for part in ("codes", "scale", "zero"):
            assert torch.equal(getattr(got, part), getattr(qw, part)) and getattr(got, part).dtype == getattr(qw, part).dtype


def test_fingerprint_is_checked_before_tensors_are_read(tmp_path, monkeypatch):
    from safetensors import safe_open

    save_state(tmp_path, 0, "fp", _block(), [torch.zeros(2, 3)], {})
    read = []

    class Spy:
        def __init__(self, *a, **k):
            self.inner = safe_open(*a, **k)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *a):
            return self.inner.__exit__(*a)

        def metadata(self):
            return self.f.metadata()

        def keys(self):
            return self.f.keys()

        def get_tensor(self, k):
            read.append(k)
            return self.f.get_tensor(k)

    monkeypatch.setattr("safetensors.safe_open", Spy)
    with pytest.raises(LowbitError, match="different model, recipe or calibration"):
        load_state(tmp_path, "another run")
    assert read == []
    assert load_state(tmp_path, "fp")["block"] == 0 and len(read) > 0  # the spy sees reads


def test_no_pickle_loading_in_the_sources():
    offenders = [f"{p}:{i}" for p in SRC.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "weights_only=False" in line or "pickle.load" in line]
    assert offenders == []
