"""The simulation table of docs/compare.md "Sequential decisions": false-decision rates of the confidence
sequence and of a bootstrap CI re-read after every batch, 1000 simulated runs per row.

    python benchmarks/bench_sequential_sim.py

16 prompts x 4 seeds, prompt effects with sd 0.02 (normal, skewed, heavy-tailed, very skewed), seed noise
sd 0.01, gate 0.05, true inflation at the gate and 0.5 points on either side; looks after every batch.
"""

from __future__ import annotations

from normscope.measure.simulate import error_rates

GATE = 0.05


def main() -> None:
    print("| prompt effects | batch (looks) | true inflation | CS false decisions | CS mean samples | "
          "bootstrap re-read: false decisions | bootstrap mean samples |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("normal", "skewed", "heavy", "very-skewed"):
        for batch in (8, 2):
            for shift in (0.0, -0.005, 0.005):
                r = error_rates(1000, GATE + shift, GATE, seed=11, kind=kind, batch=batch, boot=400)
                print(f"| {kind} | {batch} ({64 // batch}) | {(GATE + shift) * 100:.1f} % | "
                      f"{r['cs']['false_rate'] * 100:.1f} % | {r['cs']['mean_samples']:.1f} | "
                      f"{r['bootstrap']['false_rate'] * 100:.1f} % | {r['bootstrap']['mean_samples']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
