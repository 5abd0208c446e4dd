"""blah_eval under `tune run --nproc_per_node 2` (torchrun, gloo on CPU): the questions split by
batch across ranks, each rank appending its own file, rank 0 merging: the same files as one process."""

import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow  # two processes answer with a trained tiny run: the full suite only (python -m pytest -q)

TUNE = shutil.which("tune")
FILES = ("predictions.jsonl", "predictions.json", "na_probs.json", "metrics.json", "results.md", "review_queue.jsonl",
         "eval_data.json")


def _eval(run_dir, out, nproc, cwd):
    # torchrun gives each rank one thread (OMP_NUM_THREADS=1); the single process gets the same,
    # so that both sum floats in the same order.
    launcher = [TUNE, "run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else [])
    result = subprocess.run(launcher + ["blah_eval", "--config", "demo_cpu_blah_eval", f"run_dir={run_dir}",
                                        f"output_dir={out}", "dataset.max_examples=44", "batch_size=4"],
                            cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_ranks_write_the_files_one_process_writes_and_resume(trained_run, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    _eval(trained_run, single, 1, tmp_path)
    _eval(trained_run, double, 2, tmp_path)
    for name in FILES:
        assert (double / name).read_bytes() == (single / name).read_bytes(), name
    shards = [(double / f"predictions.rank{r}-of-2.jsonl").read_text().splitlines() for r in (0, 1)]
    assert len(shards[0]) == 24 and len(shards[1]) == 20  # 11 batches of 4: ranks take 6 and 5

    # Rank 1 was killed after its first batch, mid-write, before rank 0 merged: rerun resumes.
    (double / "predictions.rank1-of-2.jsonl").write_text("\n".join(shards[1][:4]) + "\n" + shards[1][4][:30])
    for name in FILES:
        if name != "eval_data.json":
            (double / name).unlink()
    _eval(trained_run, double, 2, tmp_path)
    for name in FILES:
        assert (double / name).read_bytes() == (single / name).read_bytes(), name
