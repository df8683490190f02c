"""The fixture that checks every test for processes it left running (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")
PROCESSES = Path(__file__).with_name("processes.py")

LEAKING = """
import subprocess
import sys


def test_leaks_a_process():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_ends_its_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    process.terminate()
"""


def test_a_test_that_leaves_a_process_running_fails(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(processes=PROCESSES.read_text(), test_leak=LEAKING)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_process*"])
    result.stdout.fnmatch_lines(["*left running: * -c import time; time.sleep(600)*"])
