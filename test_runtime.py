"""runtime.py: one-line user errors, atomic writes on a full disk, workers that die with their parent, and
--help answered before the heavy imports."""
import errno
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import UserError, replace_atomically, run

SCRIPTS = ["train.py", "sample.py", "fid.py", "data.py", "analysis.py", "bench.py", "evaluate.py"]
HERE = Path(__file__).parent


def test_user_error_is_one_line_and_exit_2(capsys):
    def main(args):
        raise UserError(f"--thing {args} is not a thing")
    with pytest.raises(SystemExit) as exit_:
        run(main, 3)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --thing 3 is not a thing\n"


def test_a_full_disk_is_one_line_too(capsys):
    def main(args):
        raise OSError(errno.ENOSPC, "no space left while writing a.pt")
    with pytest.raises(SystemExit):
        run(main, None)
    assert capsys.readouterr().err == "error: no space left while writing a.pt\n"


def test_bugs_keep_their_traceback():
    def main(args):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        run(main, None)


def test_replace_atomically_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with replace_atomically(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with replace_atomically(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_full_disk_names_the_file_and_leaves_no_temporary(small_disk):
    path = small_disk / "big.bin"
    with pytest.raises(OSError) as error:
        with replace_atomically(path) as tmp, open(tmp, "wb") as f:
            f.write(b"x" * (1 << 20))
            f.flush()
    assert error.value.errno == errno.ENOSPC and f"no space left while writing {path}" in str(error.value)
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_before_the_heavy_imports(script):
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script!r}, '--help']\n"
             "try:\n"
             f"    runpy.run_path({script!r}, run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print('IMPORTED', sorted(m for m in ('torch', 'numpy', 'scipy', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=HERE, capture_output=True, text=True, check=True).stdout
    assert "usage:" in out and out.strip().endswith("IMPORTED []")
