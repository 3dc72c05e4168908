"""The short summary of tests/gpu/run_all.sh: pass / fail / skip per check, the measured tolerances and
the benchmark's figures. Exit 1 when anything failed.

    python tests/gpu/summarize.py OUT_DIR TOTAL_SECONDS
"""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def steps(out: Path) -> list[tuple[str, str, str, str]]:
    """(check, status, seconds, note) rows that run_all.sh wrote."""
    rows = []
    for line in (out / "steps.tsv").read_text().splitlines():
        check, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        rows.append((check, status, seconds, note))
    return rows


def test_rows(out: Path) -> list[tuple[str, str, str, str]]:
    """One row per test from the JUnit report, or from pytest's -v log when the report is missing."""
    report = out / "gpu-tests.xml"
    if report.exists():
        rows = []
        for case in ET.parse(report).getroot().iter("testcase"):
            status, note = "PASS", ""
            for child, label in (("failure", "FAIL"), ("error", "FAIL"), ("skipped", "SKIP")):
                found = case.find(child)
                if found is not None:
                    status, note = label, (found.get("message") or "").splitlines()[0][:160] if found.get("message") else ""
                    break
            rows.append((case.get("name", "?"), status, f"{float(case.get('time', 0)):.0f}", note))
        return rows
    log = out / "tests.log"
    words = {"PASSED": "PASS", "FAILED": "FAIL", "ERROR": "FAIL", "SKIPPED": "SKIP"}
    rows = []
    for line in log.read_text().splitlines() if log.exists() else []:
        for word, status in words.items():
            if f" {word}" in line and "::" in line:
                rows.append((line.split("::")[-1].split()[0], status, "", "no JUnit report: read from the log"))
                break
    return rows


def figures(out: Path) -> list[str]:
    """The tolerances and timings the tests measured, one line each."""
    path = out / "gpu-figures.jsonl"
    lines = []
    for line in path.read_text().splitlines() if path.exists() else []:
        item = json.loads(line)
        check = item.pop("check")
        lines.append(f"{check}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in item.items()))
    return lines


def benchmark(out: Path) -> list[str]:
    """The benchmark's figure lines (its summary line, or what it printed before a time limit)."""
    path = out / "bench.log"
    if not path.exists():
        return ["no benchmark log"]
    keep = ("device:", "torchvision", "plain loop", "estimate_curves", "max |difference|", "peak CUDA", "fits a 16 GB",
            "torch.profiler", "summary:", "values within", "VALUES OUT", "MEMORY GROWS")
    lines = path.read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith(keep)] or [line.strip() for line in lines[-3:]]


def semi_structured(out: Path) -> list[str]:
    """The 2:4 benchmark's figures: its model line and one line per timed model (or its last lines)."""
    path = out / "semi_structured.log"
    if not path.exists():
        return ["no 2:4 benchmark log"]
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if "candidate Linear layers" in line or line.startswith(("bf16,", "dense:", "all candidates",
                                                                                              "RD's half", "no 2:4"))]
    return keep or lines[-3:]


def main(out: Path, total_s: str) -> int:
    rows = steps(out)
    tests = test_rows(out)
    failed = [r for r in rows + tests if r[1] == "FAIL"]
    counts = {s: sum(r[1] == s for r in tests) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n== summary: {len(failed)} failed; tests {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['SKIP']} skipped; {total_s} s in all")
    for check, status, seconds, note in rows + tests:
        took = f"{seconds:>4} s" if seconds else "      "
        print(f"  {status:4}  {took}  {check}" + (f": {note}" if note else ""))
    measured = figures(out)
    if measured:
        print("measured by the tests:")
        for line in measured:
            print(f"  {line}")
    print("benchmark:")
    for line in benchmark(out):
        print(f"  {line}")
    print("2:4 benchmark:")
    for line in semi_structured(out):
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "?"))
