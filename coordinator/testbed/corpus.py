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


def write_device_corpus(out_dir: str | Path, index: int) -> str:
    """Write device ``index``'s domain as one .txt file per topic; returns the domain name."""
    domain = DOMAINS[index % len(DOMAINS)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in pydoc_domains()[domain].items():
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
    return domain


def write_all_text(out_dir: str | Path) -> Path:
    """All topics in one directory (the tiny model's tokenizer is trained on it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for domain, topics in pydoc_domains().items():
        (out / f"{domain}.txt").write_text("\n\n".join(topics.values()), encoding="utf-8")
    return out
