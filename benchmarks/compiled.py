"""Compiled steps: `tr.compile` on a worker process beside local eager, local `torch.compile` and
remote eager, one run (part of `make bench`, section 4i).

Each model trains from the same weights on the same batch. The first 20 steps of each variant give
its losses, compared with local `torch.compile` (1e-5 relative) and local eager (1e-4); the first
of them is the capture and compile of a compiled variant, reported apart. Then rounds of 20 steps
are timed, the variants interleaved round by round, and the medians reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import torchremote as tr
from benchmarks.training import counting, cpu_seconds, make_step, worker_process, workloads

MODELS = ("tiny MLP", "MLP 4 x 256", "transformer LM", "HF GPT2LMHeadModel")
VARIANTS = ("local eager", "local torch.compile", "remote eager", "remote tr.compile", "remote tr.compile, optimizer too")


def _timed(step, steps: int, rounds: int) -> tuple[float, float]:
    """Median ms per step over `rounds` rounds of `steps`, and the client's CPU ms per step."""
    wall, cpu = [], []
    for _ in range(rounds):
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(steps):
            step()
        wall.append((time.perf_counter() - t0) / steps * 1e3)
        cpu.append((cpu_seconds() - c0) / steps * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def _losses(step, n: int) -> list[float]:
    return [step() for _ in range(n)]


def _no_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def compiled_steps(bob: tr.Worker, steps: int, rounds: int) -> dict:
    out = {}
    for name, make_model, make_data, loss_fn, make_opt in workloads():
        if not name.startswith(MODELS) or "autocast" in name:
            continue
        torch.manual_seed(0)
        base, data = make_model(), make_data()
        _no_dropout(base)  # the losses of the variants are compared: no random masks to differ
        remote_data = tuple(t.send(bob) for t in data)
        plain = lambda opt: opt  # noqa: E731
        variants = {
            "local eager": (copy.deepcopy(base), data, plain),
            "local torch.compile": (torch.compile(copy.deepcopy(base)), data, plain),
            "remote eager": (tr.send(copy.deepcopy(base), bob), remote_data, plain),
            "remote tr.compile": (tr.compile(tr.send(copy.deepcopy(base), bob)), remote_data, plain),
            "remote tr.compile, optimizer too": (tr.compile(tr.send(copy.deepcopy(base), bob)), remote_data,
                                                 tr.compile),
        }
        row: dict = {}
        curves, stepping = {}, {}
        for label, (model, d, wrap) in variants.items():
            step = stepping[label] = make_step(model, wrap(make_opt(model.parameters())), loss_fn, d)
            t0 = time.perf_counter()
            first = step()  # capture and compile, for the compiled ones
            row[f"{label} first step s"] = time.perf_counter() - t0
            curves[label] = [first] + _losses(step, 19)
            if label.startswith("remote tr.compile"):
                with counting(bob) as counts:
                    step()
                row[f"{label} calls"], row["round_trips"] = counts["calls"], counts["round_trips"]
        timings: dict = {label: ([], []) for label in variants}
        for _ in range(rounds):  # interleaved: a slow spell of the machine hits every variant alike
            for label, step in stepping.items():
                wall, cpu = _timed(step, steps, 1)
                timings[label][0].append(wall)
                timings[label][1].append(cpu)
        for label, (wall, cpu) in timings.items():
            row[f"{label} ms"] = statistics.median(wall)
            if label.startswith("remote"):
                row[f"{label} client cpu ms"] = statistics.median(cpu)
        rel = lambda a, b: max(abs(x - y) / abs(y) for x, y in zip(a, b))  # noqa: E731
        for label in ("remote tr.compile", "remote tr.compile, optimizer too"):
            row[f"{label} max rel diff vs local compile"] = rel(curves[label], curves["local torch.compile"])
            row[f"{label} max rel diff vs local eager"] = rel(curves[label], curves["local eager"])
        row["captures"] = variants["remote tr.compile"][0].captures
        out[name] = row
    return out


def run(results: dict, quick: bool = False) -> None:
    """In a process of its own, with one worker process, as the training bench."""
    args = [sys.executable, "-m", "benchmarks.compiled"] + (["--quick"] if quick else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    results["compiled"] = json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    quick = parser.parse_args().quick
    with worker_process() as bob:
        results = compiled_steps(bob, steps=5 if quick else 20, rounds=3 if quick else 5)
    print("\n".join(report({"compiled": results})), file=sys.stderr)
    print(json.dumps(results))


def report(results: dict) -> list[str]:
    r = results.get("compiled")
    if not r:
        return []
    lines = ["", "### 4i. Compiled steps: `tr.compile` beside local eager, local `torch.compile` and remote "
             "eager (worker process; medians; ms per step)", "",
             "| model | local eager | local torch.compile | remote eager | remote tr.compile | same, optimizer too "
             "| best / local eager | best / local compile |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, x in r.items():
        le, lc, re_, rc, ro = (x[f"{k} ms"] for k in VARIANTS)
        best = min(rc, ro)
        lines.append(f"| {name} | {le:.2f} | {lc:.2f} | {re_:.2f} | {rc:.2f} | {ro:.2f} | {best / le:.2f}x | "
                     f"{best / lc:.2f}x |")
    lines += ["", "| model | client CPU ms per step: remote eager / tr.compile / optimizer too | torch calls per step: "
              "tr.compile / optimizer too | round trips | first step s: local compile / tr.compile | loss max rel "
              "diff vs local compile / eager (tr.compile; optimizer too) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, x in r.items():
        diffs = "; ".join(f"{x[f'{k} max rel diff vs local compile']:.1e} / {x[f'{k} max rel diff vs local eager']:.1e}"
                          for k in VARIANTS[3:])
        lines.append(
            f"| {name} | {x['remote eager client cpu ms']:.2f} / {x['remote tr.compile client cpu ms']:.2f} / "
            f"{x['remote tr.compile, optimizer too client cpu ms']:.2f} | {x['remote tr.compile calls']} / "
            f"{x['remote tr.compile, optimizer too calls']} | {x['round_trips']} | "
            f"{x['local torch.compile first step s']:.1f} / {x['remote tr.compile first step s']:.1f} | {diffs} |")
    return lines


def targets(results: dict) -> list[tuple[str, float, float]]:
    r = results.get("compiled") or {}
    by = lambda p: next((v for k, v in r.items() if k.startswith(p)), None)  # noqa: E731
    best = lambda x: min(x["remote tr.compile ms"], x["remote tr.compile, optimizer too ms"])  # noqa: E731
    rows = []
    for prefix, label, bound in (("transformer LM", "small transformer", 1.0), ("HF GPT2", "GPT-2 tiny", 1.0),
                                 ("MLP 4 x 256", "4x256 MLP", 1.5), ("tiny MLP", "tiny MLP", 2.0)):
        x = by(prefix)
        if x is not None:
            rows.append((f"{label} tr.compile step <= {bound} x local eager", best(x) / x["local eager ms"], bound))
    for prefix, label in (("transformer LM", "small transformer"), ("HF GPT2", "GPT-2 tiny")):
        x = by(prefix)
        if x is not None:
            rows.append((f"{label} tr.compile step <= 1.3 x local torch.compile",
                         best(x) / x["local torch.compile ms"], 1.3))
    if r:
        rows.append(("client CPU per tr.compile step <= 1 ms (worst model, optimizer too)",
                     max(x["remote tr.compile, optimizer too client cpu ms"] for x in r.values()), 1.0))
    return rows


if __name__ == "__main__":
    main()
