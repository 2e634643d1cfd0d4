"""glcic_fast.devices: the process-wide memory setting glcic_fast makes on import."""

import os
import subprocess
import sys

import pytest

# In a fresh interpreter: after importing glcic_fast, how much of a written 64 MB CPU tensor
# the kernel backs with huge pages (Linux's /proc/self/smaps, in kB).
_PROBE = """
import os, torch, glcic_fast
tensor = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
address, huge = tensor.data_ptr(), 0
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            low, high = (int(v, 16) for v in first.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)
"""


def _probe(**env):
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", _PROBE], env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    setting, huge_kb = result.stdout.split()
    return setting, int(huge_kb)


def _transparent_huge_pages():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


needs_thp = pytest.mark.skipif(not _transparent_huge_pages(),
                               reason="the kernel offers no transparent huge pages here (Linux's THP is off or absent)")


@needs_thp
def test_import_backs_large_cpu_tensors_with_huge_pages():
    setting, huge_kb = _probe()
    assert setting == "1" and huge_kb >= 32 << 10, (setting, huge_kb)  # at least half of the 64 MB


@needs_thp
def test_a_setting_in_the_environment_is_kept():
    # With THP in "madvise" mode (this machine's), nothing is huge unless PyTorch asks; in
    # "always" mode the kernel may back it anyway: only the setting is checked there.
    setting, huge_kb = _probe(THP_MEM_ALLOC_ENABLE="0")
    assert setting == "0"
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        if "[madvise]" in f.read():
            assert huge_kb == 0
