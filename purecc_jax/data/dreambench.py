"""DreamBench (the DreamBooth dataset): subjects, their class words and evaluation prompts.

Layout: `ROOT/<subject>/*.jpg` and `ROOT/prompts_and_classes.txt` (a `subject_name,class`
table, then the object and live-subject prompt lists written as Python `.format` lines).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

LIVE_SUBJECT_CLASSES = ("cat", "dog")  # DreamBooth's live subjects get the live-subject prompt list


@dataclasses.dataclass(frozen=True)
class DreamBench:
    root: Path
    classes: dict[str, str]
    object_prompts: tuple[str, ...]  # templates with {identifier} and {class_word}
    live_prompts: tuple[str, ...]

    def subject_dir(self, subject: str) -> Path:
        if subject not in self.classes:
            raise KeyError(f"{subject!r} is not a DreamBench subject in {self.root}; known: {sorted(self.classes)}")
        return self.root / subject

    def prompts(self, subject: str) -> tuple[str, ...]:
        live = self.classes[subject] in LIVE_SUBJECT_CLASSES
        return self.live_prompts if live else self.object_prompts


def _templates(block: str) -> tuple[str, ...]:
    out = []
    for text in re.findall(r"'([^']*)'\.format\(unique_token, class_token\)", block):
        out.append(text.replace("{0}", "{identifier}").replace("{1}", "{class_word}"))
    return tuple(out)


def load(root: str | Path) -> DreamBench:
    root = Path(root)
    table = root / "prompts_and_classes.txt"
    if not table.exists():
        raise FileNotFoundError(f"{table} not found: {root} is not a DreamBench folder")
    text = table.read_text(encoding="utf-8")
    classes = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z0-9_]+),([^,]+)", line.strip())
        if m and m.group(1) != "subject_name":
            classes[m.group(1)] = m.group(2).strip()
    if not classes:
        raise ValueError(f"{table}: no 'subject_name,class' rows found")
    live_at = text.find("Live Subject Prompts")
    object_prompts = _templates(text[:live_at] if live_at >= 0 else text)
    live_prompts = _templates(text[live_at:]) if live_at >= 0 else object_prompts
    return DreamBench(root, classes, object_prompts, live_prompts)
