"""CUDA checks and GPU timings for a machine with an NVIDIA GPU (not run in CI).

1. BatchNorm folding of timm ResNet-50 / MobileNetV2 on the GPU (TF32 convolutions on).
2. The GenQ pipeline end to end on the GPU (fp16 generation) with the example config and a tiny
   random diffusion model.
3. The quantization engine benchmark's settings on the GPU: the 4-conv BN CNN, QDrop W4A4 and
   W2A4 with 3000 steps per layer on 1024 real calibration images, top-1 on the 10k test set
   (compare with the CPU rows in BENCHMARKS.md).

Fashion-MNIST comes from a tensor file (the GPU machine has no Debian package), made by
``python benchmarks/gpu_check.py --export-data FILE`` on a machine that has it:

    python benchmarks/gpu_check.py --data FILE [--iters 3000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from genq_core.bench.classifiers import BNConvNet, evaluate_top1
from genq_core.bench.fashion_mnist import normalize, to_float_images
from genq_core.quant import QuantConfig, ReconstructionConfig, prepare_model, quantize_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, help="tensor file from --export-data")
    parser.add_argument("--export-data", type=Path, help="write the tensor file and exit")
    parser.add_argument("--iters", type=int, default=3000)
    args = parser.parse_args()
    if args.export_data:
        _export(args.export_data)
        return
    device = torch.device("cuda")
    results: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "tf32_conv": torch.backends.cudnn.allow_tf32,
    }

    # 1. BN folding on the GPU with TF32 convolutions
    folded = {}
    for name in ("resnet50", "mobilenetv2_100"):
        net = timm.create_model(name, pretrained=False).eval().to(device)
        qmodel = prepare_model(net, QuantConfig(), torch.randn(2, 3, 224, 224, device=device))
        folded[name] = len(qmodel.folded_batchnorms)
    results["bn_folded_on_gpu"] = folded
    print(folded, flush=True)

    # 2. the pipeline end to end on the GPU, fp16 generation
    from genq_core.generate.tiny import build_tiny_pipeline
    from genq_core.pipeline import load_genq_config, run_genq

    with tempfile.TemporaryDirectory() as folder:
        build_tiny_pipeline(sample_size=32).save_pretrained(Path(folder) / "sd")
        genq = load_genq_config(ROOT / "examples/fashion_tiny.yaml")
        genq = dataclasses.replace(
            genq,
            device="cuda",
            generator=dataclasses.replace(genq.generator, source=str(Path(folder) / "sd")),
        )
        started = time.perf_counter()
        result = run_genq(genq, Path(folder) / "out")
        results["pipeline"] = {
            "seconds": time.perf_counter() - started,
            "made": result.report["source"]["made"],
            "kept": result.report["calibration_images"] + result.report["holdout_images"],
            "agreement": result.report["evaluation"].get("agreement"),
            "timings": result.report["timings"],
        }
    # 3. quantization engine on the GPU
    data = torch.load(args.data)
    test_images = normalize(to_float_images(data["test_images"]))
    model = BNConvNet()
    model.load_state_dict(load_file(str(ROOT / "benchmarks/assets/bn_cnn_fmnist.safetensors")))
    model.eval()
    results["float_top1"] = evaluate_top1(model, test_images, data["test_labels"])
    rows = []
    for weight_bits in (4, 2):
        config = QuantConfig(
            weight_bits=weight_bits,
            act_bits=4,
            preset="qdrop",
            reconstruction=ReconstructionConfig(iters=args.iters),
        )
        torch.cuda.synchronize()
        started = time.perf_counter()
        qmodel = quantize_model(model, config, data["calibration"], device=device)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        top1 = evaluate_top1(qmodel.cpu(), test_images, data["test_labels"])
        rows.append({"setting": f"W{weight_bits}A4", "top1": top1, "seconds": seconds})
        print(rows[-1], flush=True)
    results["qdrop"] = rows

    print(json.dumps(results, indent=2))


def _export(path: Path) -> None:
    from genq_core.bench.fashion_mnist import load_split, split_train_indices

    images, labels = load_split("train")
    test_images, test_labels = load_split("test")
    split = split_train_indices(labels, seed=0)
    x_train = normalize(to_float_images(images[split.classifier]))
    order = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(0))
    calibration = x_train[order[:1024]].clone()  # the quant_engine benchmark's calibration set
    torch.save(
        {"calibration": calibration, "test_images": test_images, "test_labels": test_labels}, path
    )


if __name__ == "__main__":
    main()
