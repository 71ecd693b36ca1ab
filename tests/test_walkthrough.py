"""docs/walkthrough.md, run as a user would: its files written into an empty folder, its commands run
there in order (gfnlm on a tiny model in place of SmolLM2, two steps in place of sixty)."""

import json
import os
import re
import shlex
import subprocess
import sys

from conftest import tiny_overrides

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "walkthrough.md")
BLOCK = re.compile(r"^```(\w+)(?: file=(\S+))?\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str | None, str]]:
    """(language, file name or None, text) of every fenced block, in order."""
    return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(open(DOC).read())]


def test_the_walkthrough_runs_from_an_empty_folder(tiny_llama, tmp_path):
    found = blocks()
    files = [name for _, name, _ in found if name]
    assert files == ["prompts.jsonl", "myreward.py", "custom.yaml", "api_demo.py"]
    tiny = [o for o in tiny_overrides(tiny_llama, "unused", **{"learner.steps": 2, "eval.samples_per_record": 2})
            if not o.startswith(("task.", "run.output_dir"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ran = []
    for lang, name, text in found:
        if name:
            (tmp_path / name).write_text(text)
            continue
        if lang != "bash":
            continue
        for line in text.splitlines():
            if not line.strip():
                continue
            argv = shlex.split(line)
            if argv[0] == "gfnlm":
                argv = [sys.executable, "-m", "gfnlm.learner.cli", *argv[1:]]
                if argv[3] in ("train", "check"):
                    argv += sum([["-o", o] for o in tiny], [])
            elif argv[0] == "python":
                argv = [sys.executable, *argv[1:]]
            out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, (line, out.stderr[-3000:])
            ran.append((line.split()[:2], out))
    assert [r[0] for r in ran] == [["gfnlm", "check"], ["gfnlm", "train"], ["gfnlm", "sample"], ["python", "api_demo.py"]]
    assert "task custom: 11 train, 0 validation and 1 test records" in ran[0][1].stderr
    rows = [json.loads(x) for x in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    evaluated = json.loads((tmp_path / "runs" / "mine" / "eval.json").read_text())
    assert {"trained", "sample"} <= set(evaluated["methods"]) and "log_r_mean" in evaluated["methods"]["trained"]
    lines = [json.loads(x) for x in ran[2][1].stdout.strip().splitlines()]
    assert len(lines) == 4 and all(isinstance(x["log_r"], float) and "z" in x for x in lines)
    assert len(ran[3][1].stdout.strip().splitlines()) == 4
