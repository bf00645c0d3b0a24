#!/usr/bin/python3
"""Tests scripts/validate-plan against a fake ferry: every policy of the grid runs once per round,
the medians are compared with the predictions, the bounds decide PASS / FAIL and the exit code,
a row off by more than its rounds' spread is named, a failed run stops the script. The fake's
measurements are the predictions times a factor, so every outcome is known (the timings of a
real grid are a benchmark, run by hand: bench/RESULTS.md)."""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "validate-plan")

FAKE = r'''#!/usr/bin/python3
import hashlib, json, os, sys
args = sys.argv[1:]
if args[0] == "probe":
    print("fake probe"); sys.exit(0)
assert args[0] == "bench" and "--predict" in args, args
s = " ".join(args)
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in s:
    print("ferry: fake failure", file=sys.stderr); sys.exit(3)
if "--gpu-mem" in args and "--policy" not in args and "--gpu-batch-size 16" in s and "80,20,0" in s:
    print("ferry: the policy does not fit --gpu-mem", file=sys.stderr); sys.exit(1)
count = os.path.join(os.environ["FAKE_DIR"], "calls")
n = int(open(count).read()) if os.path.exists(count) else 0
open(count, "w").write(str(n + 1))
h = int(hashlib.sha256(" ".join(a for a in args if "/" not in a).encode()).hexdigest()[:8], 16)
step, prefill = 0.01 + (h % 1000) * 1e-4, 0.1 + (h % 777) * 1e-3
factor = 1.3 if os.environ.get("FAKE_BAD") and os.environ["FAKE_BAD"] in s else 1.05
wobble = 1.0 + 0.01 * (n % 3)  # rounds differ by 0-2%
auto = "--policy" in args
tok = 100.0 * (float(os.environ.get("FAKE_AUTO", "1.2")) if auto else 1.0 / (1 + (h % 7)))
def flag(name, default):
    return args[args.index(name) + 1] if name in args else default
line = {"decode_step_s": step * factor * wobble, "prefill_s": prefill * factor * wobble, "throughput_tok_s": tok * wobble,
        "predicted": {"decode_step_s": step, "prefill_s": prefill, "bound": "compute"},
        "weights_percent": [float(x) for x in flag("--weights", "10,90,0").split(",")],
        "gpu_batch_size": int(flag("--gpu-batch-size", "8")), "num_gpu_batches": int(flag("--num-gpu-batches", "1")),
        "kv_cache": "full", "kv_dtype": "F32", "policy": "auto" if auto else "manual"}
with open(flag("--jsonl", None), "a") as f:
    f.write(json.dumps(line) + "\n")
'''


def run(tmp, name, env_extra, grid="stand-in", repeat="2"):
    fake_dir = os.path.join(tmp, name)
    os.makedirs(fake_dir)
    ferry = os.path.join(fake_dir, "ferry")
    with open(ferry, "w") as f:
        f.write(FAKE)
    os.chmod(ferry, 0o755)
    env = dict(os.environ, FAKE_DIR=fake_dir, **env_extra)
    out = os.path.join(fake_dir, "out")
    p = subprocess.run([sys.executable, SCRIPT, "--out", out, "--repeat", repeat, "--ferry", ferry, "--grid", grid]
                       + (["--device", "cuda"] if grid == "gpu" else []),
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    calls = int(open(os.path.join(fake_dir, "calls")).read()) if os.path.exists(os.path.join(fake_dir, "calls")) else 0
    summary = None
    if os.path.exists(os.path.join(out, "summary.json")):
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    return p, calls, summary


def check(cond, what, p=None):
    if not cond:
        print(f"FAIL: {what}" + (f"\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}" if p else ""), file=sys.stderr)
        sys.exit(1)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        # Every prediction within 5%-7%, auto above its grid: PASS, exit 0, each policy run in both rounds.
        p, calls, s = run(tmp, "pass", {})
        check(p.returncode == 0, f"a grid within its bounds exits 0 (got {p.returncode})", p)
        check(s is not None and s["pass"] and s["runs_per_policy"] == 2, "summary.json says PASS over 2 rounds", p)
        check(s["policies"] >= 20, f"the stand-in grid has at least 20 hand policies (has {s['policies']})", p)
        check(0.049 < s["decode_step_error"]["median"] < 0.071 and s["prefill_error"]["max"] < 0.071, f"errors are the medians' ({s})", p)
        check(s["auto"]["ratio"] > 1.0 and s["past_bound_beyond_spread"] == [], "auto beats its grid; no row past the bound", p)
        # Per round: the stand-in grid, auto's grid of 10 less the one that does not fit (tried once,
        # in the first round, and not counted: the fake refuses it before counting), and auto.
        check(calls == 2 * (s["policies"] + 9 + 1), f"every policy once per round ({calls} runs)", p)
        check("PASS" in p.stdout and "| tiny-opt |" in p.stdout, "the table and verdict are printed", p)
        # One policy 30% off, beyond its 2% spread: FAIL, exit 2, named.
        p, _, s = run(tmp, "bad", {"FAKE_BAD": "--weights 0,50,50 --gpu-batch-size 8"})
        check(p.returncode == 2 and not s["pass"], f"a row past 20% fails the run (exit {p.returncode})", p)
        check(0.29 < s["decode_step_error"]["max"] < 0.33, f"the worst error is that row's 30% ({s['decode_step_error']})", p)
        check(any("0,50,50 --gpu-batch-size 8" in x for x in s["past_bound_beyond_spread"]), f"the row is named ({s['past_bound_beyond_spread']})", p)
        # Auto slower than its best grid policy: FAIL.
        p, _, s = run(tmp, "slow-auto", {"FAKE_AUTO": "0.5"})
        check(p.returncode == 2 and s["auto"]["ratio"] < 0.95, f"auto below 0.95 of the grid fails (ratio {s and s['auto']['ratio']})", p)
        # A run that fails stops the script with exit 1 and its error.
        p, _, _ = run(tmp, "fail", {"FAKE_FAIL": "--weights 0,0,100 --gpu-batch-size 8"})
        check(p.returncode == 1 and "fake failure" in p.stderr, f"a failed bench exits 1 with its error (exit {p.returncode})", p)
        # The GPU grid (the one a GPU session runs once, with no time to debug it there), one round.
        p, calls, s = run(tmp, "gpu", {}, grid="gpu", repeat="1")
        check(p.returncode == 0 and s["pass"] and s["device"] == "cuda" and s["policies"] >= 20, f"the GPU grid runs (exit {p.returncode})", p)
    print("validate-plan: all checks passed")


if __name__ == "__main__":
    main()
