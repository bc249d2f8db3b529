"""What the bench sends: synthetic prompts of N tokens (or a prompt file) and output lengths."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# Common English words, each one token with a leading space in GPT-2-style BPE vocabularies
# (SmolLM2's, the default model's: 1,000 random words encode to exactly 1,000 tokens). Random
# sequences of them make prompts with no shared prefix, so prefix caching does not flatter.
WORDS = ["time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school", "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week", "company", "system", "program", "question", "work", "government", "number", "night", "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea", "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door", "health", "person", "art", "war", "history", "party", "result", "change", "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force", "education", "river", "stone", "light", "garden", "engine", "market", "winter", "letter", "silver", "forest", "music", "window", "planet", "paper", "table", "bridge", "island", "summer", "mountain", "ocean", "street", "train", "doctor", "animal", "color", "field", "season", "voice", "dream", "church", "heart", "bank", "plant", "energy", "wall", "road"]

# Without a tokenizer, prompt lengths are estimated at one token per word (exact for the
# default model's tokenizer; close for other BPE vocabularies on these words).
TOKENS_PER_WORD = 1.0


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A token count: `128` (fixed), `uniform:LO:HI` (inclusive) or `normal:MEAN:STD`."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        text = str(spec).strip()
        parts = text.split(":")
        try:
            if len(parts) == 1:
                d = cls("fixed", int(parts[0]))
            elif len(parts) == 3 and parts[0] in ("uniform", "normal"):
                d = cls(parts[0], float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad length {text!r}: use N, uniform:LO:HI or normal:MEAN:STD") \
                from None
        if d.a < 1 or (d.kind == "uniform" and d.b < d.a) or d.b < 0:
            raise ValueError(f"bad length {text!r}: lengths are >= 1 and LO <= HI")
        return d

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    @property
    def high(self) -> int:
        """A length few samples exceed (for sizing a server's context)."""
        if self.kind == "fixed":
            return int(self.a)
        return int(self.b) if self.kind == "uniform" else round(self.a + 3 * self.b)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        return f"{self.kind}:{self.a:g}:{self.b:g}"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: str
    prompt_tokens: int  # exact with a tokenizer, else an estimate
    output_tokens: int  # max_tokens / max_new_tokens sent (and forced where the server allows)


class TokenCounter(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True, slots=True)
class FilePrompt:
    text: str
    output_tokens: int | None = None


def load_prompt_file(path: str | Path) -> list[FilePrompt]:
    """One prompt per line, or JSONL: a string or an object with `prompt` (or `text`) and
    optionally `output_tokens` (or `max_tokens`). Blank lines are skipped."""
    out: list[FilePrompt] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip()[:1] in ('{', '"'):
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: bad JSON: {e}") from None
            if isinstance(obj, str):
                out.append(FilePrompt(obj))
                continue
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: expected a string or {{\"prompt\": ...}}")
            olen = obj.get("output_tokens", obj.get("max_tokens"))
            if olen is not None and (not isinstance(olen, int) or olen < 1):
                raise ValueError(f"{path}:{n}: output_tokens must be a positive integer")
            out.append(FilePrompt(text, olen))
        else:
            out.append(FilePrompt(line))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


class Workload:
    """Deterministic requests: request `i` of stream `salt` is the same in every run with the
    same seed, so two servers compared get identical workloads and each concurrency level
    (a different salt) gets fresh prompts."""

    def __init__(self, prompt_tokens: LengthDist, output_tokens: LengthDist, *, seed: int = 0,
                 tokenizer: TokenCounter | None = None,
                 prompt_file: list[FilePrompt] | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.seed = seed
        self.tokenizer = tokenizer
        self.prompt_file = prompt_file
        self._file_counts: dict[int, int] = {}

    @property
    def exact_prompt_tokens(self) -> bool:
        return self.tokenizer is not None

    def spec(self, salt: str, i: int) -> RequestSpec:
        rng = random.Random(f"{self.seed}:{salt}:{i}")  # str seeds hash the same in every run
        if self.prompt_file is not None:
            k = rng.randrange(len(self.prompt_file))
            fp = self.prompt_file[k]
            if k not in self._file_counts:
                self._file_counts[k] = self._count(fp.text)
            out = fp.output_tokens or self.output_tokens.sample(rng)
            return RequestSpec(fp.text, self._file_counts[k], out)
        n = self.prompt_tokens.sample(rng)
        out = self.output_tokens.sample(rng)
        return RequestSpec(*self._synthetic(n, rng), out)

    def specs(self, salt: str, n: int) -> list[RequestSpec]:
        return [self.spec(salt, i) for i in range(n)]

    def _count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return max(1, round(len(text.split()) * TOKENS_PER_WORD))

    def _synthetic(self, n: int, rng: random.Random) -> tuple[str, int]:
        words = [rng.choice(WORDS) for _ in range(int(n / TOKENS_PER_WORD) + 8)]
        text = " ".join(words)
        if self.tokenizer is None:
            return " ".join(words[:max(1, round(n / TOKENS_PER_WORD))]), n
        # Cut at exactly n tokens; decoding and re-encoding can merge across the cut, so
        # report the re-encoded count.
        ids = self.tokenizer.encode(text, add_special_tokens=False)[:n]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text, len(self.tokenizer.encode(text, add_special_tokens=False))


def load_tokenizer(model: str) -> TokenCounter:
    """tokenmill's own tokenizer loader (a model folder, a .gguf file, a Hub id, or `default`
    for the embedded default model). Imports torch (through tokenmill.loader)."""
    from tokenmill.frontend.llm_engine import load_tokenizer as _load
    from tokenmill.loader import resolve_model

    return _load(resolve_model(None if model == "default" else model))
