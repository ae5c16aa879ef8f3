"""An independent, deliberately plain re-implementation of lm-evaluation-harness 0.4.x ``hellaswag``.

It shares no code with ``llamafuse.runtime``: the text preprocessing, ``_encode_pair``
tokenization and acc / acc_norm follow the harness (``lm_eval/tasks/hellaswag/utils.py``,
``HFLM._encode_pair``, ``HFLM._loglikelihood_tokens``, ``ConfigurableTask.process_results``), and
every (context, ending) pair gets its own unpacked causal forward pass through the float64
reference model over the *source* checkpoint (``llamafuse.formats.reference.Reference``), exactly
as the harness runs one request per pair (no shared-context packing, no tensor parallelism, no
fused weights). Pairs of equal length run side by side as one batch, which changes nothing.

Tokenizers: a ``sentencepiece.SentencePieceProcessor`` or a ``tokenizers.Tokenizer``, plus the
BOS id to put first (None: none), as the harness's tokenizer would with its own special tokens.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from llamafuse.formats.reference import Reference


def preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py::preprocess."""
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_doc(doc: dict) -> dict:
    """lm_eval/tasks/hellaswag/utils.py::process_docs (one doc)."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def tok_encode(tok, text: str, bos_id: int | None) -> list[int]:
    """HFLM.tok_encode: the tokenizer's ids, with BOS first when the tokenizer adds one."""
    if hasattr(tok, "encode_batch"):  # tokenizers.Tokenizer
        ids = tok.encode(text, add_special_tokens=False).ids
    else:                             # sentencepiece.SentencePieceProcessor
        ids = list(tok.encode(text))
    return ids if bos_id is None else [bos_id] + ids


def encode_pair(tok, context: str, continuation: str, bos_id: int | None) -> tuple[list[int], list[int]]:
    """HFLM._encode_pair: trailing context spaces move to the continuation; the continuation's
    tokens are those of the whole string after the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = tok_encode(tok, context + continuation, bos_id)
    context_enc = tok_encode(tok, context, bos_id)
    continuation_enc = whole_enc[len(context_enc):]
    return context_enc, continuation_enc


def requests(doc: dict, tok, bos_id: int | None) -> list[tuple[list[int], list[int]]]:
    """The four loglikelihood requests of one doc: (context tokens, continuation tokens)."""
    d = process_doc(doc)
    # multiple_choice: arguments are (doc_to_text, target_delimiter + choice), delimiter " ".
    return [encode_pair(tok, d["query"], " " + c, bos_id) for c in d["choices"]]


def loglikelihoods(ref: Reference, reqs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
    """HFLM._loglikelihood_tokens for each request, each run on its own: run (ctx + cont)[:-1],
    take the log-softmax at the last len(cont) positions and sum the continuation tokens' log-probs."""
    assert all(cont for _, cont in reqs), "empty continuation"
    inputs = [(ctx + cont)[:-1] for ctx, cont in reqs]
    lls = [0.0] * len(reqs)
    for j, logits in ref.stream(inputs, last=[len(cont) for _, cont in reqs]):  # positions len(ctx)-1 .. end-1
        logp = torch.log_softmax(logits.double(), dim=-1)
        lls[j] = float(logp.gather(1, torch.tensor(reqs[j][1], dtype=torch.long)[:, None]).sum())
    return lls


def loglikelihood(ref: Reference, context_enc: list[int], continuation_enc: list[int]) -> float:
    """One request's log-likelihood."""
    return loglikelihoods(ref, [(context_enc, continuation_enc)])[0]


def harness_scores(ref: Reference, docs: Sequence[dict], tok, bos_id: int | None) -> list[list[float]]:
    """Per doc, the four summed continuation log-likelihoods, as the harness computes them."""
    lls = loglikelihoods(ref, [r for doc in docs for r in requests(doc, tok, bos_id)])
    return [lls[4 * i: 4 * i + 4] for i in range(len(docs))]


def harness_predictions(doc: dict, lls: Sequence[float]) -> tuple[int, int]:
    """ConfigurableTask.process_results for multiple_choice: acc uses argmax(lls), acc_norm
    argmax(lls / len(choice)) over the choice strings' characters; np.argmax: first max wins."""
    choices = process_doc(doc)["choices"]
    arr = np.array(lls, dtype=np.float64)
    lens = np.array([float(len(c)) for c in choices])
    return int(np.argmax(arr)), int(np.argmax(arr / lens))


def harness_metrics(docs: Sequence[dict], lls: Sequence[Sequence[float]]) -> dict:
    """acc, acc_norm (means) and their standard errors (sample std / sqrt(n), as the harness)."""
    acc, acc_norm = [], []
    for doc, row in zip(docs, lls, strict=True):
        gold = int(doc["label"])
        pred, pred_norm = harness_predictions(doc, row)
        acc.append(1.0 if pred == gold else 0.0)
        acc_norm.append(1.0 if pred_norm == gold else 0.0)

    def stderr(xs: list[float]) -> float:
        if len(xs) < 2:
            return 0.0
        mu = sum(xs) / len(xs)
        var = sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)
        return (var / len(xs)) ** 0.5

    n = len(acc)
    return {"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n,
            "acc_stderr": stderr(acc), "acc_norm_stderr": stderr(acc_norm), "n": n}
