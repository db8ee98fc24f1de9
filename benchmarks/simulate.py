"""Rehearsed at scale on this CPU: the simulated per-rank peak memory of one training step of v3-mini (5.7B)
at world 64 under FSDP2 + ep 8, of the h100_multinode profile (DDP + ep 8, 16 GPUs) and of every other
shipped profile, beside the analytic estimate.

    python benchmarks/simulate.py            # every profile in configs/hardware and configs/runs (~6 min)
    python benchmarks/simulate.py --quick    # v3-mini at world 64 only (about 1.5 minutes); make bench

Each row comes from `python -m dsmoe.estimate CONFIG --simulate --world N`'s functions
(dsmoe.estimate.rehearse): rank 0 of the job runs the real build, wrapping, forward, backward and AdamW
step on fake tensors over a fake process group, and torch's memory tracker books the peak by category
(dsmoe/train/simulate.py lists what it assumes: balanced routing, CPU kernels, DDP's buckets). The
analytic estimate (dsmoe/tools/memory.py) is given for the same CPU kernels (what the simulation runs)
and for CUDA's. Goal: the estimate within 10% of the simulated peak. Table with rich; JSON to
benchmarks/results/simulate-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

# (config, world): the two at scale first, then every shipped profile at the world it is launched with
CASES = (("configs/runs/v3-mini-h100-fsdp.yaml", 64), ("configs/hardware/h100_multinode.yaml", 16),
         ("configs/runs/v3-mini-h100-fsdp.yaml", 8), ("configs/hardware/h100_node.yaml", 8),
         ("configs/hardware/g4dn_12xlarge.yaml", 4), ("configs/hardware/rtx4060.yaml", 1),
         ("configs/hardware/cpu.yaml", 1), ("configs/runs/tiny-shakespeare.yaml", 1))
GOAL = 0.10  # |estimate / simulated - 1|
GiB = 2 ** 30


def run_case(path: str, world: int) -> dict:
    from dsmoe.config import load_config
    from dsmoe.estimate import estimate_rows, rehearse

    cfg = load_config(REPO_ROOT / path)
    sim, est_cpu, est_cuda = rehearse(cfg, world, cfg.parallel.ep)
    cpu, cuda = estimate_rows(est_cpu), estimate_rows(est_cuda)
    return {"config": path, "model": cfg.model.name, "world": world, "ep": sim["ep"], "dp": sim["dp"],
            "precision": sim["precision"], "simulated": sim["peak"], "estimate_cpu_kernels": cpu,
            "estimate_cuda": cuda, "estimate_over_simulated": cpu["total"] / sim["peak"]["total"],
            "estimate_peak_at": est_cpu["peak_at"], "checkpoint": sim["checkpoint"],
            "assumptions": sim["assumptions"], "micro_steps": sim["micro_steps"], "seconds": sim["seconds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="v3-mini at world 64 only")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    rows = [run_case(path, world) for path, world in (CASES[:1] if args.quick else CASES)]
    for r in rows[:2]:
        table = [[key if key != "total" else "peak", f"{r['simulated'][key] / GiB:.2f}",
                  f"{r['estimate_cpu_kernels'][key] / GiB:.2f}", f"{r['estimate_cuda'][key] / GiB:.2f}"]
                 for key in r["simulated"]]
        ck = r["checkpoint"]
        dp = "FSDP2" if r["dp"] == "fsdp" else "DDP"
        print_table(f"{r['model']} @ {Path(r['config']).stem}: rank 0 of world {r['world']} ({dp}, ep "
                    f"{r['ep']}, {r['precision']}), simulated on CPU ({device_name('cpu')}) in {r['seconds']:.0f} s",
                    ["per rank at the peak", "simulated GiB", "estimate GiB (CPU kernels)", "estimate GiB (CUDA)"],
                    table, caption=f"estimate / simulated {r['estimate_over_simulated']:.3f}; checkpoint: this rank's "
                                   f"shards {ck['rank_bytes'] / GiB:.2f} GiB, whole {ck['whole_bytes'] / GiB:.2f} GiB")
    print_table("Every profile: simulated peak per rank vs the analytic estimate (CPU kernels)",
                ["config", "world", "layout", "simulated GiB", "estimate GiB", "estimate / simulated", "seconds"],
                [[Path(r["config"]).stem, r["world"], f"{r['dp']}, ep {r['ep']}, {r['precision']}",
                  f"{r['simulated']['total'] / GiB:.3f}", f"{r['estimate_cpu_kernels']['total'] / GiB:.3f}",
                  f"{r['estimate_over_simulated']:.3f}", f"{r['seconds']:.0f}"] for r in rows])
    worst = max(abs(r["estimate_over_simulated"] - 1) for r in rows)
    met = worst <= GOAL
    print(f"estimate vs simulated peak: worst {worst:.1%} off (goal <= {GOAL:.0%}: {'met' if met else 'NOT met'})")
    payload = {"device_type": "cpu", "quick": args.quick, "goal": GOAL, "rows": rows, "worst_rel_diff": worst,
               "goal_met": met, "goals": [{"goal": f"analytic estimate within {GOAL:.0%} of the simulated peak",
                                           "worst": "every config run", "value": worst,
                                           "target": GOAL, "met": met}]}
    if not args.no_save:
        path = write_results("simulate-quick" if args.quick else "simulate", payload, device="cpu")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
