#!/usr/bin/env python3
"""Writes the two prompt sets of `make demo-osd`, from text every fresh machine with Python already has.

Phase A (prose): paragraphs of the Python documentation that ships inside the standard library
(`pydoc_data.topics`, the text behind `help()`). Phase B (code): the beginnings of top-level functions
of CPython's standard library sources (signature and the first lines of the body). Nobody here wrote
either. One prompt per line, newlines escaped as `\\n`; deterministic order (a fixed shuffle), so two
runs replay the same workload.

Usage: osd-prompts.py OUT_A OUT_B [COUNT]
"""

import os
import random
import re
import sys
import sysconfig


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def prose(count: int) -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(para.split())
            # Plain sentences only: no tables, code or headings.
            if not (200 <= len(text) <= 600) or not text[0].isupper() or ">>>" in text:
                continue
            if sum(c.isalpha() or c == " " for c in text) < 0.9 * len(text):
                continue
            sentences = re.split(r"(?<=[.!?]) ", text)
            prompt = " ".join(sentences[:2])
            if 120 <= len(prompt) <= 400:
                out.append(prompt)
    random.Random(1).shuffle(out)
    return out[:count]


def code(count: int) -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    out = []
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py") or name.startswith("_") or "test" in name:
            continue
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for i, line in enumerate(lines):
            if not line.startswith("def "):
                continue
            body = lines[i : i + 6]
            if len(body) < 6 or any(not l.strip() for l in body[1:]):
                continue
            prompt = "\n".join(body) + "\n"
            if 120 <= len(prompt) <= 400:
                out.append(prompt)
    random.Random(2).shuffle(out)
    return out[:count]


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    for path, prompts in ((sys.argv[1], prose(count)), (sys.argv[2], code(count))):
        if len(prompts) < 8:
            sys.exit(f"osd-prompts: only {len(prompts)} prompts for {path}")
        with open(path, "w", encoding="utf-8") as f:
            for p in prompts:
                f.write(escape(p) + "\n")
        print(f"osd-prompts: {len(prompts)} prompts -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
