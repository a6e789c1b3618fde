"""One-time torch work in a passing thread leaves no OpenMP team behind (fleetlm.executor.openmp)."""

import subprocess
import sys

import pytest

from fleetlm.executor.openmp import in_passing_thread

# A fresh process counts its OS threads before and after a parallel torch op run in a passing
# thread, then in the main thread. A team's worker threads live as long as the thread that
# started the team; they end a moment after it, so the count is awaited, within a deadline.
_SCRIPT = """
import os, time, torch
from fleetlm.executor.openmp import in_passing_thread
torch.set_num_threads(2)
big = torch.empty(1 << 20)  # not filled: filling would run a parallel region here
threads = lambda: len(os.listdir("/proc/self/task"))
def awaited(count):
    deadline = time.monotonic() + 30
    while threads() != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads()
before = threads()
in_passing_thread(torch.add, big, big, out=big)
after_passing = awaited(before)
torch.add(big, big, out=big)
after_main = threads()
in_passing_thread(torch.add, big, big, out=big)
print(before, after_passing, after_main, awaited(after_main))
"""


def test_a_passing_threads_team_ends_with_it_and_the_main_threads_stays():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    before, after_passing, after_main, main_later = map(int, out)
    assert after_passing == before
    # the main thread's team: one more thread for 2 threads, outliving a later passing one's
    assert after_main == main_later == before + 1


def test_the_result_and_the_exception_reach_the_caller():
    assert in_passing_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(KeyError, match="missing"):
        in_passing_thread(lambda: {}["missing"])
