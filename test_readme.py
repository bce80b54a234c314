"""README's quick start must run as written."""
from pathlib import Path


def test_quick_start_runs(capsys):
    readme = (Path(__file__).parent / "README.md").read_text()
    code = readme[readme.index("## Quick start"):].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md quick start", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["step 0", "step 20", "step 40", "step 60"]
    first, last = (float(line.split("loss ")[1].split(",")[0]) for line in (printed[0], printed[-1]))
    assert last < first  # it learns
