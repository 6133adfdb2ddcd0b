"""Corpus-level generation metrics with multiple references per input, from maintained libraries
only (nothing hand-written):

* ``bleu``    — sacrebleu corpus BLEU (13a tokenisation, 0–100), references grouped per table;
* ``rouge_l`` — rouge-score ROUGE-L F-measure, the best reference per table (``score_multi``),
  averaged over tables, ×100;
* ``nist``    — nltk ``corpus_nist`` (n = 5, as in mteval/e2e-metrics) on 13a tokens;
* ``meteor``  — nltk ``meteor_score`` (×100), only when nltk's WordNet data is installed
  (``python -m nltk.downloader wordnet``); nltk's METEOR is not the METEOR-1.5 jar e2e-metrics runs;
* ``cider``   — pycocoevalcap (coco-caption) CIDEr, only when ``pycocoevalcap`` is installed.

Absent metrics are left out of the result (and named once in a warning), never estimated.
BLEU/NIST differ in detail from the official e2e-metrics script (its own tokenisation), so compare
numbers against papers that used sacrebleu, or re-score the written generations with that script.
"""

from __future__ import annotations

import logging

from dpft.errors import DpftError

log = logging.getLogger("dpft")
_WARNED: set[str] = set()


def require() -> None:
    """Fail early (before a run directory exists) when the mandatory libraries are missing."""
    missing = []
    for mod, pkg in (("sacrebleu", "sacrebleu"), ("rouge_score", "rouge-score"), ("nltk", "nltk")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise DpftError(f"generation metrics need {', '.join(missing)} (pip install 'dpft[gen]')")


def _warn_once(name: str, why: str) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning("%s not computed: %s", name, why)


def _wordnet_available() -> bool:
    import nltk

    for res in ("corpora/wordnet", "corpora/wordnet.zip"):
        try:
            nltk.data.find(res)
            return True
        except LookupError:
            pass
    return False


def corpus_metrics(hyps: list[str], refs: list[list[str]], lowercase: bool = False) -> dict[str, float]:
    """``hyps[i]`` is the output for table i, ``refs[i]`` all of its references (≥ 1)."""
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} reference groups")
    if any(not r for r in refs):
        raise ValueError("every table needs at least one reference")
    import sacrebleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    out: dict[str, float] = {}
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]  # None = no ref
    out["bleu"] = float(sacrebleu.corpus_bleu(hyps, streams, lowercase=lowercase).score)

    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    out["rouge_l"] = 100.0 * sum(scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)

    tok13a = Tokenizer13a()

    def toks(s: str) -> list[str]:
        return tok13a(s.lower() if lowercase else s).split()

    h_tok = [toks(h) for h in hyps]
    r_tok = [[toks(x) for x in r] for r in refs]
    from nltk.translate.nist_score import corpus_nist

    try:
        out["nist"] = float(corpus_nist(r_tok, h_tok, n=5))
    except ZeroDivisionError:  # every hypothesis empty
        out["nist"] = 0.0

    if _wordnet_available():
        from nltk.translate.meteor_score import meteor_score

        out["meteor"] = 100.0 * sum(meteor_score(r, h) for h, r in zip(h_tok, r_tok)) / len(hyps)
    else:
        _warn_once("meteor", "nltk WordNet data is not installed (python -m nltk.downloader wordnet)")

    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        _warn_once("cider", "pycocoevalcap is not installed (pip install 'dpft[cider]')")
    else:
        gts = {i: [" ".join(t).lower() for t in r] for i, r in enumerate(r_tok)}
        res = {i: [" ".join(t).lower()] for i, t in enumerate(h_tok)}
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out
