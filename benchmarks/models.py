"""Per architecture (default configuration, 6 bands, 7 classes): parameters, GFLOPs per 512 x 512
window, and forward throughput in Mpx/s, fp32 and channels-last + bf16 autocast, on the CPU (and
on a CUDA GPU when there is one).

    python benchmarks/models.py [--window 512] [--batch 2] [--repeats 3]

Prints a table and appends it to benchmarks/results/models.json. Throughput is the median of
``--repeats`` timed batches after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _results import append_result
from torch.utils.flop_counter import FlopCounterMode

from geoseg.models import MODELS, create_model, parameter_count, receptive_field


def gflops(model: torch.nn.Module, window: int) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 6, window, window))
    return counter.get_total_flops() / 1e9


def throughput(
    model: torch.nn.Module, window: int, batch: int, repeats: int, device: str, bf16: bool
) -> float:
    x = torch.randn(batch, 6, window, window, device=device)
    m = model.to(device)
    if bf16:
        m = m.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            m(x)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
    return batch * window * window / statistics.median(times) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name in sorted(MODELS):
        model = create_model(name, 6, 7).eval()
        row = {
            "arch": name,
            "parameters": parameter_count(model),
            "gflops_per_window": round(gflops(model, args.window), 2),
            "receptive_field": receptive_field(model, 6),
        }
        for dev in devices:
            for bf16 in (False, True):
                key = f"{dev}_{'bf16_cl' if bf16 else 'fp32'}_mpx_s"
                row[key] = round(
                    throughput(model, args.window, args.batch, args.repeats, dev, bf16), 3
                )
        rows.append(row)
        print(json.dumps(row))
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    append_result(
        "models",
        {
            "torch": torch.__version__,
            "threads": args.threads,
            "window": args.window,
            "batch": args.batch,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
