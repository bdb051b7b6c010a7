"""The configuration table of the README, made from the settings classes themselves.

Every service setting is a field of :class:`~services.common.settings.StoreSettings` (both
services), :class:`~services.api.settings.ApiSettings` (the API) or
:class:`~services.workers.dispatcher.DispatcherSettings` (the dispatcher and its workers), read
from ``GENQ_<FIELD>``. ``python -m services.settings_doc`` rewrites the README's table between its
``settings`` markers; a test checks that the README and ``deploy/env.example`` are current.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path

from pydantic_settings import BaseSettings

from services.api.settings import ApiSettings
from services.common.settings import StoreSettings
from services.workers.dispatcher import DispatcherSettings

__all__ = ["SettingRow", "markdown_table", "rows", "update_readme"]

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
_OWNERS: tuple[tuple[type[BaseSettings], str], ...] = (
    (StoreSettings, "both"),
    (ApiSettings, "API"),
    (DispatcherSettings, "workers"),
)

SettingRow = tuple[str, str, str, str]
"""(variable, read by, default, meaning)"""


def rows() -> Iterator[SettingRow]:
    """One row per setting, each under the first class that has it."""
    seen: set[str] = set()
    for cls, owner in _OWNERS:
        for name, field in cls.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            factory = field.default_factory
            default = factory() if factory is not None else field.default  # type: ignore[call-arg]
            yield f"GENQ_{name.upper()}", owner, _shown(default), field.description or ""


def markdown_table() -> str:
    lines = ["| variable | read by | default | meaning |", "|---|---|---|---|"]
    for variable, owner, default, meaning in rows():
        lines.append(f"| `{variable}` | {owner} | {default} | {meaning.replace('|', '/')} |")
    return "\n".join(lines)


def update_readme(readme: Path) -> bool:
    """Rewrite the table between the markers; whether anything changed."""
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {BEGIN} ... {END} section")
    new = pattern.sub(lambda _: f"{BEGIN}\n{markdown_table()}\n{END}", text)
    readme.write_text(new)
    return new != text


def _shown(value: object) -> str:
    if value is None or value == []:
        return "—"
    if isinstance(value, Enum):
        value = value.value
    return f"`{value}`"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--print", action="store_true", help="print the table, change nothing")
    args = parser.parse_args(argv)
    if args.print:
        print(markdown_table())
    else:
        changed = update_readme(args.readme)
        print(f"{args.readme}: {'updated' if changed else 'already current'}")


if __name__ == "__main__":
    main()
