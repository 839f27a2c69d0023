"""The detector's learned stage: a fine-tuned all-MiniLM-L6-v2 cross-encoder over (prompt, answer head).

Trained offline by ``scripts/train_detector_model.py`` (torch, in a separate environment) on the four
corpora of real model answers, exported to ONNX and int8-quantised; at run time it needs only
``onnxruntime`` and ``tokenizers``. The files ship as package data beside this module:

* ``refusal_minilm.int8.onnx`` - the quantised model (one logit: refusal);
* ``refusal_minilm.tokenizer.json`` - the WordPiece tokenizer of all-MiniLM-L6-v2;
* ``refusal_minilm.json`` - how it was trained, the input layout and the SHA-256 of both files, which
  :class:`LearnedStage` verifies on load (a mismatch raises: a stale or corrupted model is not used).

Input layout (``encode``, shared with the training script so both read the same tokens):
``[CLS] last PROMPT_TOKENS tokens of the prompt [SEP] first ANSWER_TOKENS tokens of the answer [SEP]``,
segment 0 for the prompt part, 1 for the answer part; without a prompt the prompt part is empty (the
model was trained with the prompt dropped from a share of the rows, so it reads answers alone too).
Only the first ``ANSWER_CHARS`` characters of the answer and the last ``PROMPT_CHARS`` of the prompt are
tokenized, so the cost does not grow with either.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from importlib import resources
from typing import Any

MODEL_RESOURCE = "refusal_minilm.int8.onnx"
TOKENIZER_RESOURCE = "refusal_minilm.tokenizer.json"
META_RESOURCE = "refusal_minilm.json"
PROMPT_TOKENS = 32
ANSWER_TOKENS = 96
PROMPT_CHARS = 400
ANSWER_CHARS = 512  # = detector.HEAD_CHARS: the learned stage reads only the head window


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(tokenizer: Any, prompt: str | None, response: str) -> tuple[list[int], list[int]]:
    """(input ids, token type ids) of one (prompt, answer) pair for a ``tokenizers.Tokenizer`` without
    truncation or padding of its own (``configure`` sets that)."""
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    answer = tokenizer.encode(response[:ANSWER_CHARS], add_special_tokens=False).ids[:ANSWER_TOKENS]
    asked: list[int] = []
    if prompt:
        asked = tokenizer.encode(prompt[-PROMPT_CHARS:], add_special_tokens=False).ids[-PROMPT_TOKENS:]
    ids = [cls, *asked, sep, *answer, sep]
    return ids, [0] * (len(asked) + 2) + [1] * (len(answer) + 1)


def configure(tokenizer: Any) -> Any:
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class LearnedStage:
    """The quantised cross-encoder, loaded from the package data (or ``directory``) after checking both
    files' SHA-256 against the recorded ones; thread-safe (onnxruntime sessions may be run from several
    threads) and run with ``threads`` intra-op threads (default 1: the proxy labels answers off the
    request path and should not take every core)."""

    def __init__(self, threads: int = 1, directory: Any = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        base = resources.files("guard.truth") if directory is None else directory  # a Path or Traversable
        self.meta: dict[str, Any] = json.loads(base.joinpath(META_RESOURCE).read_text(encoding="utf-8"))
        model = base.joinpath(MODEL_RESOURCE).read_bytes()
        tok = base.joinpath(TOKENIZER_RESOURCE).read_bytes()
        for name, data in ((MODEL_RESOURCE, model), (TOKENIZER_RESOURCE, tok)):
            if sha256_bytes(data) != self.meta["sha256"][name]:
                raise ValueError(f"guard/truth/{name} does not match the SHA-256 recorded in {META_RESOURCE}: "
                                 "a stale or corrupted model (retrain: scripts/train_detector_model.py)")
        self.tokenizer = configure(Tokenizer.from_str(tok.decode("utf-8")))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._lock = threading.Lock()  # the tokenizer object is not documented as thread-safe

    def logit(self, response: str, prompt: str | None = None) -> float:
        import numpy as np

        with self._lock:
            ids, types = encode(self.tokenizer, prompt, response)
        feed = {"input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
                "token_type_ids": np.array([types], dtype=np.int64)}
        out = self.session.run(None, {k: v for k, v in feed.items() if k in self._inputs})[0]
        return float(out.reshape(-1)[0])

    def probability(self, response: str, prompt: str | None = None) -> float:
        z = self.logit(response, prompt)
        return 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0
