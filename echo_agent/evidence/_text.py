"""Tokenisation for the knowledge retriever: lower-case, expand lexicon synonyms, light stemming.

Documents and queries go through the same function, so a synonym written in either one meets its
canonical term in the other. The expansion map holds lexicon equivalences (BI-RADS and renal
terminology, British/American spelling) — it is domain vocabulary, not a list tuned to benchmark
queries. Bump :data:`TOKENIZER_VERSION` whenever anything here changes: it is part of the index
cache key.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

TOKENIZER_VERSION = "1"

# Phrase -> canonical terms appended to the text (the phrase itself is kept). Patterns are matched on
# lower-cased text with hyphens turned into spaces.
_EXPANSIONS: tuple[tuple[str, str], ...] = (
    # BI-RADS orientation. "notparallel" is a single token so that "parallel" alone does not match it.
    (
        r"\bnot parallel\b|\bnon ?parallel\b|\bantiparallel\b|\btaller than wide\b|\bvertical(ly)? orient",
        "notparallel",
    ),
    (r"\bwider than tall\b|\bhorizontal(ly)? orient", "parallel"),
    # margins
    (r"\bill defined\b|\bpoorly defined\b|\bblurred margin|\bechogenic (halo|rim)\b", "indistinct"),
    (r"\bwell defined\b|\bsharply defined\b|\bsmooth margin|\bsharp margin", "circumscribed"),
    (r"\bstellate\b|\bspiculations?\b|\bspicules?\b|\bradiating lines?\b", "spiculated"),
    (r"\bmicrolobulations?\b", "microlobulated"),
    (
        r"\bmacrolobulat\w*|\bgentle lobulations?\b|\bgently lobulated\b|\bellipsoid\b|\belliptical\b|\begg shaped\b",
        "oval",
    ),
    # posterior features
    (r"\bshadow(s|ed)?\b|\battenuation\b|\battenuating\b", "shadowing"),
    (r"\bthrough transmission\b|\bacoustic enhancement\b|\benhanced through", "enhancement"),
    # echo pattern
    (r"\becho ?free\b|\bno internal echoes\b", "anechoic"),
    (r"\bechogenic foc(us|i)\b|\bmicrocalcifications?\b|\bcalcified\b", "calcifications"),
    (r"\bhyperechogenic\w*|\bhyperechogenicity\b", "hyperechoic"),
    (r"\bhypoechogenic\w*|\bhypoechogenicity\b", "hypoechoic"),
    (r"\bcomplex cystic (and )?solid\b|\bcystic solid\b|\bmixed cystic\b", "complex cystic solid"),
    (r"\binhomogeneous\b|\bmixed echogenicity\b", "heterogeneous"),
    # assessment
    (r"\bbi rads\b|\bbirads\b", "birads"),
    (r"\bcancers?\b|\bcarcinomas?\b|\bmalignan\w*", "malignant"),
    (r"\bprobability\b|\blikelihood\b|\bchance\b|\brisk of malignancy\b", "likelihood"),
    (r"\bfollow ?up\b|\bsurveillance\b", "followup"),
    # kidney
    (r"\bcalculi\b|\bcalculus\b|\bnephrolithiasis\b|\burolithiasis\b|\blithiasis\b", "stone"),
    (r"\baml\b", "angiomyolipoma"),
    (r"\brcc\b", "renal cell carcinoma"),
    (r"\bpyelectasis\b|\bpelviectasis\b|\bpyelocaliectasis\b", "pelvis dilatation hydronephrosis"),
    (r"\bhydro\b|\bhydronephrotic\b", "hydronephrosis"),
    (r"\bmedical renal disease\b|\brenal parenchymal disease\b", "parenchymal disease"),
    (r"\baprpd\b|\bapd\b|\bap diameter\b", "renal pelvic diameter"),
    (r"\bprenatal\b|\bfetal\b|\bin utero\b", "antenatal"),
    (r"\bkidneys?\b", "renal"),
)
_EXPANSION_RES = tuple((re.compile(p), repl) for p, repl in _EXPANSIONS)

# Single-word spelling variants mapped before stemming (British -> American and a few abbreviations).
_VARIANTS: dict[str, str] = {
    "tumour": "tumor",
    "tumours": "tumors",
    "oedema": "edema",
    "haemorrhage": "hemorrhage",
    "haemorrhagic": "hemorrhagic",
    "haematoma": "hematoma",
    "haemangioma": "hemangioma",
    "hyperaemia": "hyperemia",
    "paediatric": "pediatric",
    "dilation": "dilatation",
    "dilated": "dilatation",
    "ultrasonography": "ultrasound",
    "sonography": "ultrasound",
    "sonographic": "ultrasound",
    "sonographically": "ultrasound",
    "us": "ultrasound",
    "idc": "invasive ductal carcinoma",
    "ilc": "invasive lobular carcinoma",
    "ckd": "chronic kidney disease",
    "adpkd": "polycystic kidney disease",
}

# Deliberately short: negations ("not", "no") and single letters/digits ("0", "4a", "i") carry meaning.
_STOPWORDS = frozenset(
    """a an the and or of in on at to for from by with within into onto as is are was were be been
    being it its this that these those there their they them than then which who whom whose what when
    where how do does did can could may might should would will shall has have had having about also
    such very more most some any each other per via if so but""".split()
)

_TOKEN_RE = re.compile(r"[a-z0-9]+")

# Suffixes removed by the light stemmer, longest first; a stem keeps at least 4 characters.
_SUFFIXES = (
    "ational",
    "ations",
    "ation",
    "ements",
    "ement",
    "ments",
    "ment",
    "icity",
    "ities",
    "ity",
    "ically",
    "ical",
    "ness",
    "ings",
    "ing",
    "ances",
    "ance",
    "ences",
    "ence",
    "ancy",
    "ency",
    "ated",
    "ates",
    "ate",
    "ied",
    "ies",
    "ous",
    "ive",
    "ed",
    "es",
    "ic",
    "al",
    "ly",
    "s",
    "y",
    "e",
)
_MIN_STEM = 4


@lru_cache(maxsize=8192)
def stem(word: str) -> str:
    """Strip common English suffixes until none applies (deterministic, dependency-free).

    >>> [stem(w) for w in ("calcifications", "calcified", "shadowing", "shadows", "spiculated", "spiculation")]
    ['calcif', 'calcif', 'shadow', 'shadow', 'spicul', 'spicul']
    """
    if word.isdigit() or len(word) <= _MIN_STEM:
        return word
    changed = True
    while changed:
        changed = False
        for suf in _SUFFIXES:
            if word.endswith(suf) and len(word) - len(suf) >= _MIN_STEM:
                word = word[: -len(suf)]
                changed = True
                break
    return word


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    # "4-a", "bi-rads", "taller-than-wide" -> words separated by spaces; keep "4a"/"4b" joined.
    text = re.sub(r"[-_/]", " ", text)
    text = re.sub(r"\b([0-6]) ([abc])\b", r"\1\2", text)
    return text


def tokenize(text: str) -> list[str]:
    """Turn text into index terms: normalise, append synonym expansions, drop stopwords, stem.

    >>> tokenize("Taller-than-wide mass with posterior shadow")
    ['taller', 'wide', 'mass', 'posterior', 'shadow', 'notparallel', 'shadow']
    """
    text = _normalise(text)
    extra = [repl for rx, repl in _EXPANSION_RES if rx.search(text)]
    if extra:
        text = text + " " + " ".join(extra)
    out: list[str] = []
    for tok in _TOKEN_RE.findall(text):
        tok = _VARIANTS.get(tok, tok)
        for t in tok.split():
            if t in _STOPWORDS:
                continue
            out.append(stem(t))
    return out


__all__ = ["TOKENIZER_VERSION", "stem", "tokenize"]
