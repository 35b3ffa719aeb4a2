"""Vector search with quantized embeddings: recall@10 of inner-product search vs exact search.

    .venv/bin/python bench/kv_search.py

Embeddings: mean-pooled last hidden states of SmolLM2-135M (d=576) over sentences of the stdlib pydoc
text (no sentence-embedding model is available offline), centred and L2-normalised.  Database from the
calibration part, queries from the held-out part.  Writes bench/results/kv_search.json.
"""

from __future__ import annotations

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
    from lowbit.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("default")
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    split = load_text("pydoc")
    db_text, q_text = sentences(split.calibration, 4000), sentences(split.evaluation, 300)
    db, q = embed(model, tok, db_text), embed(model, tok, q_text)
    mu = db.mean(0, keepdim=True)
    db, q = db - mu, q - mu
    db, q = db / db.norm(dim=-1, keepdim=True), q / q.norm(dim=-1, keepdim=True)
    d = db.shape[-1]
    rows = []
    for bits in (1, 2, 3, 4):
        cands = {"turboquant": TurboQuantMSE(d, bits), "turboquant-prod": TurboQuantProd(d, bits),
                 "polarquant": PolarQuant(d, bits), "qjl": QJL(d, bits)}
        if bits >= 2:
            cands["int (per-vector, g=32)"] = KIVI(d, bits, mode="value", group_size=32)
        for name, quant in cands.items():
            r = recall_at_k(q, db, quant, k=10)
            rows.append({"method": name, "bits": bits, **r})
            print(f"{name:>24}  bits={bits}  stored bits/coord={r['bits_per_coordinate']:.3f}  "
                  f"recall@10={r['recall']:.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    res = {"dim": d, "database": len(db_text), "queries": len(q_text), "rows": rows}
    (OUT / "kv_search.json").write_text(json.dumps(res, indent=2))
    print(f"database {len(db_text)} x {d}, {len(q_text)} queries; wrote {OUT / 'kv_search.json'}")


if __name__ == "__main__":
    main()
