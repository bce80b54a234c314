"""README's Python example must run as written (test_train.py runs its train.py command)."""
from pathlib import Path


def test_python_example_runs(capsys):
    readme = (Path(__file__).parent / "README.md").read_text()
    code = readme[readme.index("### The pieces, from Python"):].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md example", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["step 0", "step 20", "step 40", "step 60"]
    first, last = (float(line.split("loss ")[1].split(",")[0]) for line in (printed[0], printed[-1]))
    assert last < first  # it learns
