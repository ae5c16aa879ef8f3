"""An independent, deliberately plain re-implementation of lm-evaluation-harness 0.4.x ``hellaswag``.

It shares no code with ``llamafuse.runtime.hellaswag`` / ``llamafuse.runtime.evaluate``: the
text preprocessing, ``_encode_pair`` tokenization and acc / acc_norm follow the harness
(``lm_eval/tasks/hellaswag/utils.py``, ``HFLM._encode_pair``, ``HFLM._loglikelihood_tokens``,
``ConfigurableTask.process_results``), and every (context, ending) pair gets its own unpacked
forward pass through the float64 reference model over the *source* checkpoint
(``llamafuse.convert.reference.reference_logits``), exactly as the harness runs one request per
pair (no shared-context packing, no tensor parallelism, no fused weights).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from llamafuse.convert.reference import reference_logits


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


def tok_encode(sp, text: str, bos: bool) -> list[int]:
    """HFLM.tok_encode: the tokenizer's ids, with BOS first when add_bos_token."""
    ids = list(sp.encode(text))
    return [sp.bos_id()] + ids if bos else ids


def encode_pair(sp, context: str, continuation: str, bos: bool) -> tuple[list[int], list[int]]:
    """HFLM._encode_pair: trailing context spaces move to the continuation; the continuation's
    tokens are those of the whole string after the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = tok_encode(sp, context + continuation, bos)
    context_enc = tok_encode(sp, context, bos)
    continuation_enc = whole_enc[len(context_enc):]
    return context_enc, continuation_enc


def requests(doc: dict, sp, bos: bool) -> list[tuple[list[int], list[int]]]:
    """The four loglikelihood requests of one doc: (context tokens, continuation tokens)."""
    d = process_doc(doc)
    # multiple_choice: arguments are (doc_to_text, target_delimiter + choice), delimiter " ".
    return [encode_pair(sp, d["query"], " " + c, bos) for c in d["choices"]]


def loglikelihood(src, context_enc: list[int], continuation_enc: list[int]) -> float:
    """HFLM._loglikelihood_tokens for one request, unbatched: run (ctx + cont)[:-1], take the
    log-softmax at the last len(cont) positions and sum the continuation tokens' log-probs."""
    assert continuation_enc, "empty continuation"
    whole = context_enc + continuation_enc
    inp = whole[:-1]
    # reference_logits runs each sequence causally on its own, so the logits at the positions
    # of `inp` are the same whether we pass `inp` or `whole`; pass exactly the harness's input.
    logits = reference_logits(src, [inp])[0]                       # [len(inp), vocab] float64
    logp = torch.log_softmax(logits.double(), dim=-1)
    n = len(continuation_enc)
    cont_logp = logp[len(inp) - n:]                                # positions len(ctx)-1 .. end-1
    tgt = torch.tensor(continuation_enc, dtype=torch.long)
    return float(cont_logp.gather(1, tgt[:, None]).sum())


def harness_scores(src, docs: Sequence[dict], sp, bos: bool) -> list[list[float]]:
    """Per doc, the four summed continuation log-likelihoods, as the harness computes them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 matmuls: thread start-up costs more than the work
    try:
        return [[loglikelihood(src, c, e) for c, e in requests(doc, sp, bos)] for doc in docs]
    finally:
        torch.set_num_threads(threads)


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
