"""tools.mutate, the mutation-testing command: the project's list still applies to the
tree (a file edited since makes it stale, and this says which block); the list format's
errors are usage errors naming their lines; and on a tiny repository of its own, a
mutation its test catches is 'caught', an equivalent one 'SURVIVED', the working tree
is never touched, and a baseline that already fails stops the run."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tools import mutate


def run(argv):
    return mutate.main(mutate.get_args_parser().parse_args([str(a) for a in argv]))


def test_the_projects_mutation_list_applies(capsys):
    assert run(["--check"]) == 0, capsys.readouterr().err
    mutations = mutate.parse_mutations(open(os.path.join(ROOT, "tests", "mutations.txt")).read())
    assert len(mutations) >= 20
    assert all(os.path.isfile(os.path.join(ROOT, m.file)) for m in mutations)


@pytest.mark.parametrize("text,words", [
    ("file: a.py\n", "text before the first '== name' line"),
    ("== x\nfile: a.py\ntests: t.py\n", "has no '- ' lines"),
    ("== x\n- a\n+ b\n", "has no file:, tests:"),
    ("== x\nfile: a.py\ntests: t.py\n- a\n+ a\n", "with the same text"),
    ("== x\nfile: a.py\ntests: t.py\n- a\n+ b\n== x\nfile: a.py\ntests: t.py\n- a\n+ c\n", "two mutations are named 'x'"),
    ("== x\nfile: a.py\ntests: t.py\nfrobnicate\n- a\n", "list.txt:4: expected 'file:'"),
    ("# only a comment\n", "no mutations"),
])
def test_list_format_errors(text, words):
    with pytest.raises(mutate.MutationFileError, match=words):
        mutate.parse_mutations(text, "list.txt")


def test_multi_line_and_empty_replacements():
    m = mutate.parse_mutations("== two lines\nfile: a.py\ntests: t.py -k 'x or y'\n- a = 1\n- b = 2\n+ a = 2\n+\n")[0]
    assert (m.old, m.new, m.tests) == ("a = 1\nb = 2", "a = 2\n", ["t.py", "-k", "x or y"])


CALC = "def is_adult(age):\n    return age >= 18\n"
TEST_CALC = ("from calc import is_adult\n\n\ndef test_edges():\n"
             "    assert is_adult(18) and is_adult(19) and not is_adult(17)\n")
MUTATIONS = """== the edge moved
file: calc.py
tests: test_calc.py
- return age >= 18
+ return age > 18

== an equivalent rewrite
file: calc.py
tests: test_calc.py
- return age >= 18
+ return not age < 18
"""


def tiny_repo(root, test_text=TEST_CALC):
    root.mkdir()
    (root / "calc.py").write_text(CALC)
    (root / "test_calc.py").write_text(test_text)
    (root / "mutations.txt").write_text(MUTATIONS)
    return root


@pytest.mark.subprocess
def test_caught_and_survived_in_a_copy(tmp_path, capsys):
    repo = tiny_repo(tmp_path / "repo")
    out = tmp_path / "results.jsonl"
    code = run(["--repo", repo, "--mutations", "mutations.txt", "--timeout", 120, "--out", out])
    printed = capsys.readouterr().out
    assert code == 1  # one survived
    assert "caught" in printed.splitlines()[-3] and "the edge moved" in printed.splitlines()[-3]
    assert "SURVIVED" in printed.splitlines()[-2] and "an equivalent rewrite" in printed.splitlines()[-2]
    assert printed.splitlines()[-1] == "total: 2 mutations, 1 caught, 1 survived"
    assert [json.loads(line)["result"] for line in out.read_text().splitlines()] == ["caught", "SURVIVED"]
    assert (repo / "calc.py").read_text() == CALC  # the working tree is never touched
    assert sorted(p.name for p in repo.iterdir()) == ["calc.py", "mutations.txt", "test_calc.py"]
    assert run(["--repo", repo, "--mutations", "mutations.txt", "--only", "edge", "--skip_baseline"]) == 0


@pytest.mark.subprocess
def test_a_failing_baseline_stops_the_run(tmp_path, capsys):
    repo = tiny_repo(tmp_path / "repo", TEST_CALC.replace("not is_adult(17)", "is_adult(17)"))
    assert run(["--repo", repo, "--mutations", "mutations.txt", "--timeout", 120]) == 2
    assert "the unmutated copy fails" in capsys.readouterr().err


def test_usage_errors_exit_2_before_running(tmp_path, capsys):
    repo = tiny_repo(tmp_path / "repo")
    (repo / "calc.py").write_text(CALC.replace(">= 18", ">= 21"))  # the list is stale now
    assert run(["--repo", repo, "--mutations", "mutations.txt"]) == 2
    err = capsys.readouterr().err
    assert "'the edge moved': its '- ' text is in calc.py 0 times, not once" in err
    assert run(["--repo", repo, "--mutations", "missing.txt"]) == 2 and "missing.txt" in capsys.readouterr().err
    assert run(["--repo", repo, "--mutations", "mutations.txt", "--only", "nothing"]) == 2
    assert run(["--repo", repo, "--timeout", 0]) == 2


@pytest.mark.subprocess
def test_runs_by_path_with_help(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "mutate.py"), "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "each applies to" in proc.stdout, proc.stderr
