"""Processing purposes: hierarchical keys shipped as data (`purposes.yaml`), extensible.

A key like `modeling.lookalike` has the ancestors `modeling`; a consent rule recorded on an
ancestor covers the key. Three flags travel down the tree (a child may override them):

- `recipient_specific`: processing under the purpose *is* giving data to another party
  (`sharing.*`): a gate call must name the recipient and only a grant naming it counts.
- `separate_consent`: processing under the purpose with another party provides personal
  information to that party (PSI matching, joint modelling, scoring with a partner's model
  part), so when a gate call names a recipient only a grant naming that recipient counts
  (PIPL Art. 23: separate consent, after being told the recipient's name). Without a
  recipient (the party's own processing) a general grant counts. Purposes whose cross-party
  output is aggregate only (`audience.overlap`: a k_min-suppressed count) set it false.
- `personalised`: removed by the subject's "no personalised marketing" switch (PIPL Art. 24).

See docs/consent.md for the reasoning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from confide.errors import ConfigurationError, ValidationError

DEFAULT_FILE = Path(__file__).resolve().parent / "purposes.yaml"
_SEGMENT = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Purpose:
    key: str
    description: str
    recipient_specific: bool
    personalised: bool
    separate_consent: bool = False

    @property
    def parent(self) -> str | None:
        return self.key.rsplit(".", 1)[0] if "." in self.key else None


class PurposeRegistry:
    """The known purposes. Immutable once built; build a new one to extend."""

    def __init__(self, purposes: Iterable[Purpose]) -> None:
        self._by_key: dict[str, Purpose] = {p.key: p for p in purposes}
        for p in self._by_key.values():
            if p.parent is not None and p.parent not in self._by_key:
                raise ConfigurationError(f"purpose {p.key!r} has no parent {p.parent!r}")

    @classmethod
    def load(cls, *files: Path | str) -> "PurposeRegistry":
        """The shipped purposes, extended (or overridden key by key) by `files` in order."""
        found: dict[str, Purpose] = {}
        for f in (DEFAULT_FILE, *files):
            try:
                data = yaml.safe_load(Path(f).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigurationError(f"cannot read purposes file {f}: {exc}") from exc
            if not isinstance(data, dict) or not isinstance(data.get("purposes"), dict):
                raise ConfigurationError(f"purposes file {f} must hold a mapping under 'purposes'")
            _walk(data["purposes"], None, False, False, found, str(f), False)
        return cls(found.values())

    @classmethod
    def from_mapping(cls, tree: Mapping[str, Any]) -> "PurposeRegistry":
        found: dict[str, Purpose] = {}
        _walk(tree, None, False, False, found, "<mapping>", False)
        return cls(found.values())

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._by_key))

    def get(self, key: str, field: str = "purpose") -> Purpose:
        """The purpose `key`; raises ValidationError naming `field` if it is unknown."""
        try:
            return self._by_key[key]
        except (KeyError, TypeError):
            raise ValidationError(
                f"{field}: unknown purpose {key!r}; known purposes: {', '.join(sorted(self._by_key))}",
                field=field,
            ) from None

    def ancestors(self, key: str) -> list[str]:
        """`key` and its ancestors, most specific first (`a.b.c`, `a.b`, `a`)."""
        self.get(key)
        parts = key.split(".")
        return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]

    def descendants(self, key: str) -> list[str]:
        """`key` and every key below it."""
        self.get(key)
        return sorted(k for k in self._by_key if k == key or k.startswith(key + "."))

    def covers(self, rule_key: str, purpose: str) -> bool:
        """Whether a rule recorded on `rule_key` applies to `purpose`."""
        return purpose == rule_key or purpose.startswith(rule_key + ".")

    def recipient_specific(self, key: str) -> bool:
        return self.get(key).recipient_specific

    def personalised(self, key: str) -> bool:
        return self.get(key).personalised

    def needs_named_grant(self, key: str, recipient: str | None) -> bool:
        """Whether a gate call for `key` with `recipient` counts only grants naming the
        recipient (PIPL Art. 23): always for `recipient_specific` purposes, and for
        `separate_consent` purposes whenever a recipient is named."""
        p = self.get(key)
        return p.recipient_specific or (recipient is not None and p.separate_consent)


def _walk(
    tree: Mapping[str, Any],
    prefix: str | None,
    recipient_specific: bool,
    personalised: bool,
    out: dict[str, Purpose],
    source: str,
    separate: bool,
) -> None:
    for name, spec in tree.items():
        if not isinstance(name, str) or not _SEGMENT.match(name):
            raise ConfigurationError(f"{source}: bad purpose name {name!r} (lower-case, digits, _)")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{source}: purpose {name!r} must be a mapping")
        key = f"{prefix}.{name}" if prefix else name
        rs = bool(spec.get("recipient_specific", recipient_specific))
        pers = bool(spec.get("personalised", personalised))
        sep = bool(spec.get("separate_consent", separate)) or rs
        out[key] = Purpose(key, str(spec.get("description", "")), rs, pers, sep)
        children = spec.get("children") or {}
        if not isinstance(children, dict):
            raise ConfigurationError(f"{source}: children of {key!r} must be a mapping")
        _walk(children, key, rs, pers, out, source, sep)
