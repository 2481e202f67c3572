"""The compile report: one row per pass, the adapters, and every rejection with its reason."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .pipeline import AdapterState, PassRow


def table(header: list[str], rows: list[list[str]]) -> str:
    """Render rows as an aligned plain-text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


@dataclass
class Report:
    model: str
    frontend: str
    rows: list[PassRow] = field(default_factory=list)
    adapters: dict[str, AdapterState] = field(default_factory=dict)

    def __str__(self) -> str:
        total = sum(r.seconds for r in self.rows)
        out = [f"surgeon: {self.model} captured with {self.frontend}, {len(self.rows)} steps, {total:.2f} s", ""]
        out.append(table(
            ["pass", "matches", "rejected", "params before -> after", "trainable", "ops before -> after",
             "time", "check"],
            [[r.name, r.matches, len(r.rejections), f"{r.params[0]:,} -> {r.params[1]:,}", f"{r.trainable:,}",
              f"{r.nodes[0]} -> {r.nodes[1]}", f"{r.seconds * 1000:.0f} ms", r.check] for r in self.rows]))
        if self.adapters:
            out += ["", table(["adapter", "type", "modules", "params", "status"],
                              [[a.spec.name, a.spec.type, len(a.sites), f"{a.param_count:,}", a.status]
                               for a in self.adapters.values()])]
        notes = [f"  {r.name}: {n}" for r in self.rows for n in r.notes]
        if notes:
            out += ["", "notes:"] + notes
        rejected = [f"  {r.name}: {where}: {why}" for r in self.rows for where, why in r.rejections]
        if rejected:
            out += ["", "rejected:"] + rejected
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"model": self.model, "frontend": self.frontend, "passes": [asdict(r) for r in self.rows],
                "adapters": [{"name": a.spec.name, "type": a.spec.type, "modules": [s.path for s in a.sites],
                              "params": a.param_count, "status": a.status} for a in self.adapters.values()]}
