"""Beyond bf16 on a CPU: a trained bundle's model in ONNX Runtime, fp32 and int8 (static
quantization, QDQ, per-channel weights), against torch bf16 + channels-last, per 512 px window;
and how often each one's classes agree with torch fp32 on the NC scene's valid pixels.

    pip install onnxruntime onnx onnxscript
    python benchmarks/int8.py MODEL.bundle [--calibration minmax|percentile|entropy] [--keep-ends]

MODEL.bundle: a bundle trained on the NC scene (6 bands), e.g. by the demo. The int8 model is
calibrated on 8 shifted copies of the scene; ``--keep-ends`` leaves the first and the last
convolution in fp32. Issue 17's bar for an int8 path: classes agree with fp32 on >= 99.5 % of
valid pixels and it runs >= 1.5x faster than bf16. Prints the figures and appends them to
benchmarks/results/int8.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from _results import finish

from geoseg import load_bundle
from geoseg.pipeline import demo_workflow

WINDOW = 512
SCENE = demo_workflow().parent / "nc_landsat7_2000.tif"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--calibration", default="minmax", choices=["minmax", "percentile", "entropy"])
    ap.add_argument("--keep-ends", action="store_true")
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    try:
        import onnx
        import onnxruntime as ort
        from onnxruntime import quantization as q
    except ImportError:
        raise SystemExit("needs ONNX Runtime: pip install onnxruntime onnx onnxscript") from None

    b = load_bundle(args.bundle)
    model = b.model.eval()
    with rasterio.open(SCENE) as src:
        raw = src.read([band.index for band in b.bands]).astype(np.float32)
    mean = np.array(b.contract.mean, np.float32)[:, None, None]
    std = np.array(b.contract.std, np.float32)[:, None, None]
    x = np.zeros((1, raw.shape[0], WINDOW, WINDOW), np.float32)
    x[0, :, : raw.shape[1], : raw.shape[2]] = (raw - mean) / std
    valid = np.zeros((WINDOW, WINDOW), bool)
    valid[: raw.shape[1], : raw.shape[2]] = np.all(raw != 0, axis=0)
    threads = torch.get_num_threads()

    def timed(run: Any) -> tuple[float, np.ndarray]:
        run()
        t = time.perf_counter()
        for _ in range(args.repeats):
            y = run()
        return (time.perf_counter() - t) / args.repeats, np.asarray(y)

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "m.onnx", Path(tmp) / "m8.onnx"
        torch.onnx.export(
            model, torch.from_numpy(x), fp32_path, input_names=["x"], output_names=["y"],
            dynamo=False, opset_version=17,
        )  # fmt: skip
        convs = [n.name for n in onnx.load(fp32_path).graph.node if n.op_type == "Conv"]

        class Calibration(q.CalibrationDataReader):
            def __init__(self) -> None:
                rng = np.random.default_rng(0)
                shifts = rng.integers(0, WINDOW, size=(8, 2))
                self.items = [{"x": np.roll(x, tuple(int(v) for v in s), (2, 3))} for s in shifts]

            def get_next(self) -> dict[str, np.ndarray] | None:
                return self.items.pop() if self.items else None

        method = {
            "minmax": q.CalibrationMethod.MinMax,
            "percentile": q.CalibrationMethod.Percentile,
            "entropy": q.CalibrationMethod.Entropy,
        }[args.calibration]
        q.quantize_static(
            str(fp32_path), str(int8_path), Calibration(), quant_format=q.QuantFormat.QDQ,
            per_channel=True, activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8, calibrate_method=method,
            nodes_to_exclude=[convs[0], convs[-1]] if args.keep_ends else [],
        )  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = {
            name: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for name, p in (("ort_fp32", fp32_path), ("ort_int8", int8_path))
        }
        times, classes = {}, {}
        for name, sess in sessions.items():
            times[name], y = timed(lambda s=sess: s.run(None, {"x": x})[0])
            classes[name] = y[0].argmax(0)
        channels_last = model.to(memory_format=torch.channels_last)
        xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                times["torch_bf16"], y = timed(lambda: channels_last(xt).float())
            classes["torch_bf16"] = y[0].argmax(0)
            reference = model(torch.from_numpy(x)).numpy()[0].argmax(0)
    row: dict[str, object] = {
        "bundle": Path(args.bundle).name,
        "calibration": args.calibration,
        "keep_ends": args.keep_ends,
        "threads": threads,
    }
    for name in ("torch_bf16", "ort_fp32", "ort_int8"):
        row[f"{name}_s_per_window"] = round(times[name], 3)
        row[f"{name}_agrees_with_fp32"] = round(
            float(np.mean(classes[name][valid] == reference[valid])), 4
        )
    row["int8_speed_over_bf16"] = round(times["torch_bf16"] / times["ort_int8"], 2)
    finish("int8", [row])


if __name__ == "__main__":
    main()
