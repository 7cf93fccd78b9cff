"""One request over a prompt set (`compose --prompts FILE`): every prompt becomes its own run
folder; under `accelerate launch` each process renders its share of the prompts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from personas import GroupshotError, Persona, gather_items, my_share

PLACEHOLDER = "{person}"


def read_prompt_set(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file: one per line; blank lines and `#` comments skipped (the
    format of eval/prompts.txt)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GroupshotError(f"--prompts {path}: file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise GroupshotError(f"--prompts {path}: not a UTF-8 text file ({type(e).__name__})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise GroupshotError(f"--prompts {path}: no prompts in the file (one per line)")
    return lines


def fill_people(template: str, personas: Sequence[Persona]) -> str:
    """`{person}` becomes every person with an article: "a <brad> man and a <leo> man".

    A persona without learned tokens (a plain LoRA) is written as its class word: compose
    puts its trigger words in front of its region's prompt itself. The article rule is
    eval.scoring.subject_phrase's (eval reads the same prompt files).
    """
    if PLACEHOLDER not in template:
        return template
    phrases = []
    for p in personas:
        words = p.prompt_words() if p.tokens else p.class_word
        phrases.append(f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}")
    return template.replace(PLACEHOLDER, " and ".join(phrases))


def render_prompt_set(composer: Any, request: Any, prompts: Sequence[str]) -> list[Path]:
    """Render `request` once per prompt (its own `prompt` is replaced); the run folders, in
    prompt order, on every process.

    Every request is checked before any model loads. Under `accelerate launch` the prompts
    are split between the processes (accelerate's split_between_processes) and the folders
    gathered; a failure on any process is raised on all of them.
    """
    personas = [composer.library.load(name) for name in request.people]
    requests = [dataclasses.replace(request, prompt=fill_people(p, personas)) for p in prompts]
    for r in requests:
        composer.prepare(r)
    done: list[tuple[int, str | None, str | None]] = []
    for i, r in my_share(list(enumerate(requests))):
        try:
            done.append((i, str(composer(r).run_dir), None))
        except GroupshotError as e:  # reported on every process after the gather, not a hang
            done.append((i, None, str(e)))
            break
    every = sorted(gather_items(done))
    errors = [(i, e) for i, _, e in every if e is not None]
    if errors:
        i, e = errors[0]
        raise GroupshotError(f"prompt {i + 1} ({prompts[i]!r}): {e}")
    return [Path(d) for _, d, _ in every]
