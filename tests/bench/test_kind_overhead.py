"""benchmarks/bench_kind_overhead.py on a tiny model: its table has a row per kind asked for, every ratio a
finite positive number, and the kinds it leaves out listed with a reason (no timing is asserted)."""
import importlib.util
import math
from pathlib import Path

from surgeon.adapters import kinds

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kind_overhead.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_kind_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(text: str) -> dict[str, list[str]]:
    """kind -> its cells, from the markdown table (header and rule left out)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")][2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def ratio(cell: str) -> float:
    assert cell.endswith("x") or " (" in cell, cell
    return float(cell.split("x")[0])


def test_the_table_has_a_finite_positive_ratio_per_kind_a_failure_row_and_the_skips(tmp_path, monkeypatch):
    bench = load()
    monkeypatch.delitem(bench.FITS, "c3a")     # its default block_size 256 then cannot fit hidden 64
    out = tmp_path / "table.md"
    assert bench.main(["--layers", "2", "--hidden", "64", "--kinds", "lora", "ia3", "c3a", "prefix", "--rounds", "1",
                       "--prompt", "16", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    table = rows(text)
    assert list(table) == [bench.BASE, bench.NONE, "lora", "ia3", "c3a"]
    for kind in (bench.BASE, bench.NONE, "lora", "ia3"):
        for cell in table[kind][:2]:
            value = ratio(cell)
            assert math.isfinite(value) and value > 0, (kind, cell)
    projections = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 192), (64, 192), (192, 64)]   # q k v o gate up down
    assert int(table["lora"][2].replace(",", "")) == 2 * sum(16 * (fan_in + fan_out) for fan_in, fan_out in projections)
    assert table["lora"][3] == "rank=16" and table["ia3"][3] == ""
    assert table["c3a"][0].startswith("failed to compile: ") and "block_size 256" in table["c3a"][0], table["c3a"]
    assert "- prefix: attaches to the attention call" in text


def test_every_kind_is_measured_or_skipped_with_a_reason():
    bench = load()
    found = kinds()
    for name, kind in found.items():
        reason = bench.skip_reason(kind)
        assert (name in bench.SKIPPED or "linear" not in kind.site_ops) == bool(reason), name


def test_shape_options_fit_every_site_and_the_rank_its_limit():
    bench = load()
    found = kinds()
    dims = [(512, 512), (512, 256), (512, 1376), (1376, 512)]
    assert bench.fitted_options(found["c3a"], dims) == {"block_size": 32}      # 256 does not divide 1376
    assert bench.fitted_options(found["road"], dims) == {"group_size": 32}     # 64 does not divide 1376
    assert bench.fitted_options(found["oft"], dims) == {}                      # 32 divides every input
    assert bench.fitted_options(found["lora"], dims) == {"rank": 16}
    assert bench.fitted_options(found["shira"], [(8, 8)]) == {"rank": 4}       # in * out / (in + out)
