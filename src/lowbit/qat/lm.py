"""QAT of a causal LM end to end: load, PTQ start (RTN / GPTQ / AWQ records, or min-max), fake
quant, distillation against the full-precision model in the same process, convert, save.
`lowbit train-qat` runs `train_qat_lm`; the bench uses the pieces."""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowbit.calibration import calibration_batches
from lowbit.calibration.text import load_text
from lowbit.calibration.windows import tokenize
from lowbit.errors import LowbitError
from lowbit.qat.config import QATConfig, qat_scheme
from lowbit.qat.convert import convert_qat
from lowbit.qat.losses import causal_lm_ce, causal_lm_kd
from lowbit.qat.prepare import prepare_qat, qat_parameters
from lowbit.qat.trainer import TrainConfig, TrainResult, train

log = logging.getLogger(__name__)
INITS = ("rtn", "gptq", "awq", "minmax")
LOSSES = ("kd", "ce")
METHODS = ("block-ap", "e2e")
DEFAULT_LR = {"block-ap": (1e-3, 1e-3), "e2e": (1e-5, 1e-5)}  # (weights, scales / zeros)


@dataclass(frozen=True)
class LMQATOptions:
    """scheme: weight-only preset (w3g64, w2g64, w4g64, ...); init: the PTQ start; data: a text
    source as --calib takes (its calibration part trains, the held-out part is never seen);
    batch x seq_len tokens per step; calib_samples: PTQ calibration windows (gptq / awq), and
    Block-AP's training windows; train_weights: False trains the quantization scales (and zeros)
    only (EfficientQAT's E2E-QP). method: "block-ap" (EfficientQAT's Block-AP: each block trained
    to reproduce the fp block's outputs, `steps` per block; what works within a CPU budget) or
    "e2e" (the whole model against the fp model's logits, `steps` in total, `loss`); lr /
    qparam_lr None: the method's default (DEFAULT_LR)."""

    scheme: str = "w3g64"
    init: str = "gptq"
    data: str = "pydoc"
    steps: int = 40
    lr: float | None = None
    qparam_lr: float | None = None
    batch: int = 4
    seq_len: int = 256
    seed: int = 0
    calib_samples: int = 32
    loss: str = "kd"
    temperature: float = 1.0
    train_weights: bool = True
    learn_zero: bool = True
    checkpoint_every: int = 25
    method: str = "block-ap"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowbitError(f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.init not in INITS:
            raise LowbitError(f"--init {self.init!r} is unknown; choose one of {', '.join(INITS)}")
        if self.loss not in LOSSES:
            raise LowbitError(f"--loss {self.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        for key in ("batch", "seq_len", "calib_samples", "steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LowbitError(f"--{key.replace('_', '-')} {v!r} must be a positive integer")
        s = qat_scheme(self.scheme)
        if s.input is not None:
            raise LowbitError(f"--scheme {self.scheme}: train-qat trains weight-only LLM schemes (w3g64, w2g64, "
                              "w4g64, ...); activation schemes train through the Python API (lowbit.qat)")
        if self.method == "block-ap":
            self.block_ap_config()
            if self.calib_samples < self.batch:
                raise LowbitError(f"--calib-samples {self.calib_samples} must be at least --batch {self.batch} "
                                  "(Block-AP trains on the calibration windows)")
        else:
            self.train_config()

    def learning_rates(self) -> tuple[float, float]:
        lr, qlr = DEFAULT_LR[self.method]
        lr = lr if self.lr is None else self.lr
        return lr, (qlr if self.lr is None else lr) if self.qparam_lr is None else self.qparam_lr

    def train_config(self) -> TrainConfig:
        lr, qlr = self.learning_rates()
        return TrainConfig(steps=self.steps, lr=lr, qparam_lr=qlr, seed=self.seed,
                           checkpoint_every=self.checkpoint_every)

    def block_ap_config(self):
        from lowbit.qat.block_ap import BlockAPConfig

        lr, qlr = self.learning_rates()
        return BlockAPConfig(steps=self.steps, batch=self.batch, lr=lr, qparam_lr=qlr, seed=self.seed,
                             train_weights=self.train_weights)


def training_tokens(tokenizer, text: str, seq_len: int, source: str) -> torch.Tensor:
    """The training text as one token stream; too little of it is an error naming the source."""
    try:
        ids = tokenize(tokenizer, text)
    except LowbitError:
        raise LowbitError(f"--data {source}: the training text is empty") from None
    if ids.numel() < 4 * (seq_len + 1):
        raise LowbitError(f"--data {source}: its training part has {ids.numel()} tokens; QAT with --seq-len "
                          f"{seq_len} needs at least {4 * (seq_len + 1)} (give more text or a shorter --seq-len)")
    return ids


def window_batches(ids: torch.Tensor, batch: int, seq_len: int, seed: int):
    """batch_fn(step) -> [batch, seq_len] random windows of `ids`, a function of (seed, step) only."""

    def batch_fn(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 7_919 + step)
        starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=g)
        return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])

    return batch_fn


def ptq_records(model, tokenizer, spec, init: str, calib_text: str, calib_samples: int, seq_len: int,
                progress: bool = True) -> dict:
    """PTQ of the decoder blocks' Linears in place (weights written back dequantized, no swap):
    {name: record}. `minmax` is RTN's min-max grid."""
    from lowbit.methods import get_method
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    method = get_method("rtn" if init == "minmax" else init)
    calib = None
    if method.needs_calibration:
        calib = calibration_batches(tokenizer, calib_text, calib_samples, seq_len)
    recipe = Recipe(spec=spec, method=method.name)
    return dict(quantize_model(model, recipe, method, calib, progress=progress, swap=False))


def prepare_lm_student(teacher, tokenizer, opts: LMQATOptions, calib_text: str, progress: bool = True):
    """(student, records): a copy of `teacher` PTQ-quantized per opts.init and prepared for QAT."""
    scheme = qat_scheme(opts.scheme)
    student = copy.deepcopy(teacher)
    records = ptq_records(student, tokenizer, scheme.weight, opts.init, calib_text, opts.calib_samples,
                          opts.seq_len, progress)
    prepare_qat(student, QATConfig(scheme, targets=tuple(records), learn_zero=opts.learn_zero),
                init=None if opts.init == "minmax" else records)
    return student, records


def qat_state_dir(out: str | Path) -> Path:
    out = Path(out).expanduser()
    return out.parent / f".{out.name}.lowbit-qat-state"


def train_qat_lm(model_source: str, out: str | Path | None, opts: LMQATOptions, *, overwrite: bool = False,
                 progress: bool = True, state_dir: str | Path | None = None, on_step=None):
    """Load, PTQ start, QAT with distillation, convert, save `out` (lowbit format; `lowbit export`
    converts it to the other formats). Rerunning an interrupted call resumes from its checkpoint
    (kept beside `out` until the save). Returns (model with QuantLinears, tokenizer, TrainResult)."""
    from lowbit.export import format_module
    from lowbit.export.model import QuantizedModel
    from lowbit.models import load_model
    from lowbit.preflight import check_source_and_output

    kind, path = check_source_and_output(model_source, out, overwrite) if out is not None else (None, None)
    if kind in ("default", "folder"):  # a scheme the model cannot take fails before any load
        from lowbit.models.loader import default_model_dir
        from lowbit.models.validate import check_recipe_fits, read_config
        from lowbit.recipe import Recipe

        check_recipe_fits(Recipe(spec=qat_scheme(opts.scheme).weight, method="rtn"),
                          read_config(default_model_dir() if kind == "default" else path))
    try:
        split = load_text(opts.data)
    except LowbitError as e:
        msg = str(e)
        raise LowbitError(msg if msg.startswith(("text source", "--data")) else f"--data {opts.data}: {msg}") from None
    teacher, tokenizer = load_model(model_source)
    teacher.eval()
    ids = training_tokens(tokenizer, split.calibration, opts.seq_len, opts.data)
    student, _ = prepare_lm_student(teacher, tokenizer, opts, split.calibration, progress)
    for p in teacher.parameters():
        p.requires_grad_(False)
    own_state = state_dir is None and out is not None
    if own_state:
        state_dir = qat_state_dir(out)
    if opts.method == "block-ap":
        from lowbit.qat.block_ap import block_ap

        calib = calibration_batches(tokenizer, split.calibration, opts.calib_samples, opts.seq_len, seed=opts.seed + 1)
        bap = block_ap(student, teacher, calib, opts.block_ap_config(), state_dir=state_dir, progress=progress)
        losses = [v for i in sorted(bap.losses) for v in bap.losses[i]]
        result = TrainResult(steps=opts.steps * bap.blocks, losses=losses, resumed_from=bap.resumed_from)
    else:
        weights, qparams = qat_parameters(student, train_weights=opts.train_weights, train_bias=opts.train_weights)
        loss_fn = causal_lm_kd(teacher, opts.temperature) if opts.loss == "kd" else causal_lm_ce
        result = train(student, loss_fn, window_batches(ids, opts.batch, opts.seq_len, opts.seed),
                       opts.train_config(), weights, qparams, state_dir=state_dir, progress=progress, on_step=on_step)
    del teacher
    records = convert_qat(student)
    if out is not None:
        qm = QuantizedModel.from_model(student, tokenizer, records, method=f"qat-{opts.method}+{opts.init}",
                                       options=asdict(opts),
                                       source=str(model_source), calibration=opts.data,
                                       qat={"losses": result.losses[-50:], "steps": opts.steps, "method": opts.method})
        format_module("lowbit").write(qm, out, overwrite=overwrite)
        if own_state:
            shutil.rmtree(state_dir, ignore_errors=True)
    return student, tokenizer, result
