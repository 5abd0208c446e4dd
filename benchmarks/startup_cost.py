"""What torchtune_blah.pth adds to every Python start-up.

    python benchmarks/startup_cost.py [--runs 20]

Reads `python -X importtime -c pass` in fresh interpreters and reports the median
cumulative import time of torchtune_blah._tune_hook (our .pth line) next to the
whole `site` start-up it is part of (which also holds pip's and setuptools'
editable-install finders, not ours). Target: < 5 ms for our line.
"""
import argparse
import statistics
import subprocess
import sys


def cumulative_us(stderr: str, module: str) -> int:
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.split("|")[-1].strip() == module:
            return int(line.split("|")[1])
    raise SystemExit(f"{module} was not imported at start-up: is torchtune-blah installed (pip install -e .)?")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    ours, site = [], []
    for _ in range(args.runs):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
        ours.append(cumulative_us(err, "torchtune_blah._tune_hook"))
        site.append(cumulative_us(err, "site"))
    print(f"median of {args.runs} fresh interpreters:")
    print(f"  torchtune_blah._tune_hook (our .pth line): {statistics.median(ours) / 1000:.2f} ms")
    print(f"  site (all .pth files and site-packages set-up): {statistics.median(site) / 1000:.2f} ms")
    print(f"  ratio ours / site = {statistics.median(ours) / statistics.median(site):.3f}")


if __name__ == "__main__":
    main()
