"""Non-IID local text for lab devices, from documentation that ships with Python itself.

``pydoc_data.topics`` holds the language reference's help topics. They are split by
domain, so that each lab device sees different text: statements, expressions, and
the data model.
"""

from __future__ import annotations

from pathlib import Path

STATEMENTS = (
    "assert assignment async augassign await break class compound context-managers continue del else for "
    "function global if import lambda nonlocal pass raise return try while with yield"
).split()
DATA_MODEL = (
    "attribute-access bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects callable-types "
    "customization numeric-types objects sequence-types specialattrs specialnames string-methods truth types "
    "typesfunctions typesmapping typesmethods typesmodules typesseq typesseq-mutable"
).split()
DOMAINS = ("statements", "expressions", "datamodel")


def pydoc_domains() -> dict[str, dict[str, str]]:
    """``{domain: {topic: text}}`` over all of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    out: dict[str, dict[str, str]] = {d: {} for d in DOMAINS}
    for name, text in sorted(topics.items()):
        domain = "statements" if name in STATEMENTS else "datamodel" if name in DATA_MODEL else "expressions"
        out[domain][name] = text
    return out


def write_device_corpus(out_dir: str | Path, index: int, corpus: str = "pydoc") -> str:
    """Write device ``index``'s domain of ``corpus`` as one .txt file per topic; returns the domain name."""
    domains = corpus_domains(corpus)
    domain = list(domains)[index % len(domains)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in domains[domain].items():
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
    return domain


def write_all_text(out_dir: str | Path) -> Path:
    """All topics in one directory (the tiny model's tokenizer is trained on it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for domain, topics in pydoc_domains().items():
        (out / f"{domain}.txt").write_text("\n\n".join(topics.values()), encoding="utf-8")
    return out


NUMPY_DOMAINS = ("linalg", "random", "masked")
"""The second corpus: numpy's own reference docstrings, by topic (numpy is pinned, so the text is fixed)."""


def numpy_doc_domains() -> dict[str, dict[str, str]]:
    """``{domain: {name: docstring}}``: linear algebra and FFT, random sampling, masked arrays.

    Only docstrings of at least 200 characters; names in sorted order, so the corpus is the
    same on every machine with the pinned numpy.
    """
    import inspect

    import numpy as np

    modules = {"linalg": (np.linalg, np.fft), "random": (np.random,), "masked": (np.ma,)}
    out: dict[str, dict[str, str]] = {}
    for domain, mods in modules.items():
        docs: dict[str, str] = {}
        for mod in mods:
            for name in sorted(dir(mod)):
                if name.startswith("_"):
                    continue
                doc = inspect.getdoc(getattr(mod, name, None))
                if doc and len(doc) >= 200:
                    docs[f"{mod.__name__}.{name}"] = doc
        out[domain] = docs
    return out


CORPORA = ("pydoc", "numpy")


def corpus_domains(corpus: str) -> dict[str, dict[str, str]]:
    """The domains of a named corpus (``pydoc`` or ``numpy``)."""
    if corpus == "pydoc":
        return pydoc_domains()
    if corpus == "numpy":
        return numpy_doc_domains()
    raise ValueError(f"unknown corpus {corpus!r}: expected one of {', '.join(CORPORA)}")
