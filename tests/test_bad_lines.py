"""`ponder data check` on problem files with hostile lines: each is reported by file and line, none crashes the run."""

from __future__ import annotations

import json

from test_cli import ponder

from tasks import jsonl

GOOD = {"id": "a1", "task": "arithmetic", "prompt": "Compute: 2 + 3 * 4\n", "answer": "14"}


def _good(number: int) -> bytes:
    return json.dumps(GOOD | {"id": f"a{number}"}).encode()


def test_data_check_reports_a_deeply_nested_line_like_any_bad_line(tmp_path):
    path = tmp_path / "problems.jsonl"
    deep = json.dumps(GOOD)[:-1] + ', "meta": ' + "[" * 3000 + "]" * 3000 + "}"
    path.write_bytes(b"\n".join([_good(1), deep.encode(), _good(3)]) + b"\n")

    strict = ponder("data", "check", str(path))
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert f"{path}:2: nested too deeply" in strict.stderr

    skipped = ponder("data", "check", str(path), "--skip-bad-lines")
    assert skipped.returncode == 1 and "Traceback" not in skipped.stderr
    assert f"skipped {path}:2: nested too deeply" in skipped.stderr
    assert "2 problems, 1 bad lines skipped" in skipped.stdout


def test_data_check_skips_every_kind_of_hostile_line(tmp_path):
    path = tmp_path / "problems.jsonl"
    hostile = {
        2: b"[" * (jsonl.MAX_LINE_BYTES + 10),  # over-long (and deep): read in chunks and dropped
        3: bytes(range(256)).replace(b"\n", b""),  # binary, NUL bytes included
        4: _good(4).replace(b"a4", b"a\xff"),  # not UTF-8
        5: b'{"a": ' * 5000 + b"1" + b"}" * 5000,  # deep objects
        6: _good(6)[:-1] + b', "meta": {"x": NaN}}',
        7: b"[1, 2, 3]",  # not an object
        8: json.dumps(GOOD | {"steps": 7}).encode(),  # a wrong type
    }
    lines = [hostile.get(number, _good(number)) for number in range(1, 10)]
    path.write_bytes(b"\n".join(lines) + b"\n")

    strict = ponder("data", "check", str(path))
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert f"{path}:2: line longer than {jsonl.MAX_LINE_BYTES} bytes" in strict.stderr

    skipped = ponder("data", "check", str(path), "--skip-bad-lines")
    assert skipped.returncode == 1 and "Traceback" not in skipped.stderr
    reported = [line for line in skipped.stderr.splitlines() if line.startswith("skipped ")]
    assert [line.split(": ")[0] for line in reported] == [f"skipped {path}:{number}" for number in hostile]
    assert "2 problems, 7 bad lines skipped" in skipped.stdout
