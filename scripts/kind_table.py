"""The README's table of adapter kinds, made from the code and docs/adapters.md so that it cannot go stale.

    python scripts/kind_table.py            # print the table
    python scripts/kind_table.py --write    # replace the table between README.md's kind-table markers

One row per kind of `surgeon.adapters.kinds()`, in its order: the spec name, PEFT's `peft_type` (from the
PEFT format that reads it), where it attaches (the side of the base op its forward rewrites, and the
graph ops it takes), and the parameters, merge and PEFT columns of the kind's row in docs/adapters.md
(cut at their first parenthesis: the long form stays there), and its first test file.
tests/test_docs.py checks that README.md holds exactly this table.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from surgeon.adapters import kinds  # noqa: E402
from surgeon.adapters.peft_formats import BY_KIND  # noqa: E402
from surgeon.adapters.xlora_peft import PEFT_TYPE as XLORA_TYPE  # noqa: E402

OWN_LAYOUTS = {"xlora": XLORA_TYPE}   # kinds whose PEFT folders have a reader of their own, not a PeftFormat

START, END = "<!-- kind-table: made by scripts/kind_table.py -->", "<!-- kind-table end -->"
HEADER = ("| kind | PEFT type | attaches to | parameters per layer | mergeable | PEFT import / export | tested in |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")


def _docs_rows(text: str) -> dict[str, list[str]]:
    """{kind: its cells} from the first table of docs/adapters.md (the row's first cell starts `kind`)."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        name = re.match(r"`([^`]+)`", cells[0]).group(1)
        if len(cells) == 6:
            rows.setdefault(name, cells)
    return rows


def _short(cell: str) -> str:
    """A docs cell up to its first parenthesis or semicolon (the long form stays in the docs)."""
    return re.split(r" \(|;", cell, maxsplit=1)[0].strip()


def _attaches(kind) -> str:
    sides = [side for side, given in (("input", kind.forward_input), ("output", kind.forward)) if given]
    return f"{' and '.join(sides)}: {', '.join(kind.site_ops)}"


def table() -> str:
    docs = _docs_rows((ROOT / "docs" / "adapters.md").read_text())
    lines = [HEADER]
    for name, kind in kinds().items():
        cells = docs.get(name)
        if cells is None:
            raise SystemExit(f"kind_table: docs/adapters.md has no row for the kind '{name}'")
        peft = BY_KIND.get(name)
        test = cells[5].split(",")[0].strip()
        peft_type = peft.peft_type if peft else OWN_LAYOUTS.get(name, "-")
        lines.append(f"| `{name}` | {peft_type} | {_attaches(kind)} | {_short(cells[2])} | "
                     f"{_short(cells[3])} | {_short(cells[4])} | {test} |")
    return "\n".join(lines)


def readme_table(readme: str) -> str | None:
    """The table between README.md's markers, or None where they are missing."""
    if START not in readme or END not in readme:
        return None
    return readme.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str]) -> int:
    made = table()
    if argv[1:] == ["--write"]:
        path = ROOT / "README.md"
        readme = path.read_text()
        if readme_table(readme) is None:
            raise SystemExit(f"kind_table: README.md lacks the markers {START} ... {END}")
        head, rest = readme.split(START, 1)
        path.write_text(f"{head}{START}\n{made}\n{END}{rest.split(END, 1)[1]}")
    else:
        print(made)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
