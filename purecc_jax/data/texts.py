"""The four texts of PureCC (docs/method.md §2) from a caption, an identifier and a class word.

    complete  "a photo of sks dog on the beach"   trainable model, L_CC and L_PureCC
    base      "a photo of dog on the beach"       the complete text without the identifier
    target    "sks dog"                            frozen extractor, guidance
    null      ""                                   frozen extractor, guidance

The identifier is one word without spaces, distinct from the class word and its words
(`check_identifier`); captions contain it as a whole word. How the tokenizers read it (an
added token, or a plain word) is `pipeline.tokenizers`' business.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

DEFAULT_TEMPLATE = "a photo of {identifier} {class_word}"


@dataclasses.dataclass(frozen=True)
class Texts:
    complete: str
    base: str
    target: str
    null: str = ""


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(word)}(?!\S)", text) is not None


def check_identifier(identifier: str, class_word: str = "") -> None:
    """Raises ValueError naming the identifier if it is empty, has spaces, or is (a word of) the class word."""
    if not identifier or any(c.isspace() for c in identifier):
        raise ValueError(f"identifier {identifier!r} must be one non-empty word without spaces (e.g. 'sks')")
    if identifier.lower() in class_word.lower().split():
        raise ValueError(f"identifier {identifier!r} is a word of the class word {class_word!r}: removing it would "
                         "also remove the class from the base text, and the concept would overwrite the class; "
                         "choose a rare word (e.g. 'sks', 'ohwx')")


def words_containing(text: str, identifier: str) -> list[str]:
    """The words of `text` that contain `identifier` without being it ("masks" for "sks"), case-insensitively."""
    ident = identifier.lower()
    return [w for w in re.findall(r"\w+", text) if ident in w.lower() and w.lower() != ident]


def remove_identifier(text: str, identifier: str) -> str:
    """Drops every whitespace-delimited occurrence of `identifier` and tidies the spaces."""
    out = re.sub(rf"(?<!\S){re.escape(identifier)}(?!\S)", " ", text)
    return re.sub(r"\s+", " ", out).strip()


def derive(complete: str, identifier: str, class_word: str, *, base: str | None = None,
           target: str | None = None, source: str = "caption") -> Texts:
    """Texts for one caption; `base` / `target` override the derived ones. `source` names the caption in errors."""
    check_identifier(identifier, class_word)
    if not _has_word(complete, identifier):
        raise ValueError(f"{source}: {complete!r} does not contain the identifier {identifier!r} as a word")
    return Texts(
        complete=complete.strip(),
        base=base if base is not None else remove_identifier(complete, identifier),
        target=target if target is not None else f"{identifier} {class_word}".strip(),
    )


def from_template(identifier: str, class_word: str, template: str = DEFAULT_TEMPLATE) -> Texts:
    return derive(template.format(identifier=identifier, class_word=class_word), identifier, class_word,
                  source=f"template {template!r}")


def read_caption_file(path: Path, identifier: str, class_word: str) -> Texts:
    """A caption file: first line the complete text; optional `base: ...` / `target: ...` lines."""
    lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise ValueError(f"{path}: caption file is empty")
    extra = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in ("base", "target"):
            raise ValueError(f"{path}: unexpected line {line!r} (only 'base: ...' and 'target: ...' may follow)")
        extra[key.strip()] = value.strip()
    return derive(lines[0], identifier, class_word, source=str(path), **extra)
