"""Circuit-discovery tasks: contrast pairs of prompts, bundled or from a user's JSONL file.

A task is a list of pairs; each pair is one JSON object per line::

    {"clean": "When Mary and John went to the shop, John gave a bag to", "answer": " Mary",
     "corrupted": "When Mary and John went to the shop, Anna gave a bag to", "wrong": " John"}

``clean`` and ``corrupted`` must have the same number of tokens (the positions are patched one to one); ``answer``
and ``wrong`` must each be one token (mind the leading space). The metric is the logit difference
``logit(answer) - logit(wrong)`` at the last token, averaged over the pairs.

Bundled tasks (written for this project; ``circuits/tasks/*.jsonl``):

* ``ioi`` — indirect object identification: the clean prompt repeats the subject, so the answer is the other name;
  the corrupted prompt repeats a third name instead (the "ABC" corruption of Wang et al. 2022).
* ``capitals`` — country -> capital: "The capital of France is" -> " Paris" against another country's prompt and
  capital.
* ``colours`` — colour adjective -> noun: "... the sky was a clear, bright blue" style prompts where a colour
  word predicts the thing it describes (" yellow" -> " banana"), against a prompt with another colour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ConfigError

BUNDLED = ("ioi", "capitals", "colours")
FIELDS = ("clean", "corrupted", "answer", "wrong")


@dataclass(frozen=True)
class Pair:
    clean: str
    corrupted: str
    answer: str
    wrong: str


@dataclass
class Task:
    name: str
    pairs: list[Pair]
    source: str

    def __len__(self) -> int:
        return len(self.pairs)


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("neuronhunter.circuits") / "tasks" / f"{name}.jsonl"))


def parse_pairs(lines: list[str], source: str) -> list[Pair]:
    """Pairs from JSONL lines (blank lines ignored); one clear line naming the line for a bad one."""
    pairs = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}:{i} is not valid JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{source}:{i} must be a JSON object with {', '.join(FIELDS)}")
        missing = [f for f in FIELDS if not isinstance(obj.get(f), str) or not obj.get(f)]
        if missing:
            raise ConfigError(f"{source}:{i} needs a non-empty string {missing[0]!r} (fields: {', '.join(FIELDS)})")
        pairs.append(Pair(*(obj[f] for f in FIELDS)))
    if not pairs:
        raise ConfigError(f"{source} holds no contrast pairs")
    return pairs


def load_task(spec: str | Path, limit: int | None = None) -> Task:
    """A bundled task by name (:data:`BUNDLED`) or a JSONL file of pairs; the first ``limit`` pairs."""
    spec = str(spec)
    if spec in BUNDLED:
        path, name = bundled_path(spec), spec
    else:
        path, name = Path(spec).expanduser(), Path(spec).stem
        if not path.is_file():
            raise ConfigError(f"unknown task {spec!r}: give one of {', '.join(BUNDLED)} or a JSONL file of pairs")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    pairs = parse_pairs(lines, str(path))
    if limit is not None:
        pairs = pairs[:limit]
    return Task(name, pairs, str(path))
