"""Prints, as JSON, where a benchmark run happened: GPU, driver, versions, commit, date."""

import datetime
import json
import subprocess
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from measure import provenance  # noqa: E402


def main():
    info = provenance()
    info["date_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info["python"] = sys.version.split()[0]
    try:
        info["commit"] = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
        info["tree_dirty"] = bool(subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], text=True).strip())
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu_memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count,
                     "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version()})
        try:
            info["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = None
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
