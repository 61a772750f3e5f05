"""Writes tests/durations.json, the per-test times that order the suite longest first (tests/conftest.py).

    python -m pytest -n auto tests --junitxml=/tmp/suite.xml      # or bash scripts/test.sh --junitxml=...
    python scripts/test_durations.py /tmp/suite.xml [more.xml ...]

Each test's setup + call + teardown seconds (the largest over the files given); tests under --min-seconds are left
out: they keep their place in the collection, after the listed ones. Regenerate it when a slow test is added or
renamed: a slow test missing from the list runs wherever its file falls and can end up alone at the end.
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "durations.json"


def nodeid(case: ET.Element) -> str:
    # junitxml's classname is the module path with dots ("tests.test_ctc"); the suite has no test classes.
    return case.get("classname").replace(".", "/") + ".py::" + case.get("name")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("junit", nargs="+", type=Path)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seconds: dict[str, float] = {}
    for path in args.junit:
        for case in ET.parse(path).iter("testcase"):
            if case.find("skipped") is None:
                key = nodeid(case)
                seconds[key] = max(seconds.get(key, 0.0), float(case.get("time", 0)))
    kept = {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]) if v >= args.min_seconds}
    args.out.write_text(json.dumps(kept, indent=0) + "\n")
    print(f"{args.out}: {len(kept)} of {len(seconds)} tests take {args.min_seconds:g} s or more, "
          f"{sum(kept.values()) / 60:.1f} of {sum(seconds.values()) / 60:.1f} test-minutes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
