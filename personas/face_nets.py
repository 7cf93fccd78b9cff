"""insightface-layout face models with random weights, written as an ONNX model pack.

No registry package ships insightface's buffalo_l weights, so tests and the GPU benchmark
build its two models from their published layouts: the detector of SCRFD-10G-KPS
(insightface detection/scrfd configs/scrfd/scrfd_10g_bnkps.py: ResNetV1e-style backbone with
BasicBlocks (3, 4, 2, 3) at planes (56, 88, 88, 224), PAFPN to 56 channels at strides 8/16/32,
per-stride heads of three 3x3 conv+BN+ReLU at 80 channels, 2 anchors, box and 5-point outputs)
and the recogniser of w600k_r50 (arcface_torch's iresnet50). Speed does not depend on weight
values; the faces found and their embeddings mean nothing.

    python -m personas.testing arcface-random DIR [--size full|tiny]

writes DIR/det_10g.onnx and DIR/w600k_r50.onnx, usable as `ArcFaceBackend(pack="DIR")`.
A random detector would call half of its 16800 anchors a face, so the score biases are set
so that about `detections` anchors pass insightface's 0.5 threshold on a calibration image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["SCRFD_LAYOUTS", "IRESNET_LAYOUTS", "build_detector", "build_recognizer", "write_random_pack",
           "count_macs"]

# size -> layout. "full" is the published one; "tiny" keeps every stage (and so the ONNX
# operators and output shapes) at a fraction of the width and depth, for CPU tests.
SCRFD_LAYOUTS = {
    "full": dict(stem=56, blocks=(3, 4, 2, 3), planes=(56, 88, 88, 224), neck=56, head=80, head_convs=3),
    "tiny": dict(stem=8, blocks=(1, 1, 1, 1), planes=(8, 8, 8, 16), neck=8, head=8, head_convs=1),
}
IRESNET_LAYOUTS = {
    "full": dict(blocks=(3, 4, 14, 3), planes=(64, 128, 256, 512), features=512),
    "tiny": dict(blocks=(1, 1, 1, 1), planes=(8, 8, 16, 16), features=32),
}
DET_FILE, REC_FILE = "det_10g.onnx", "w600k_r50.onnx"
STRIDES = (8, 16, 32)
ANCHORS = 2


def _torch():
    import torch
    from torch import nn

    return torch, nn


def build_detector(size: str = "full"):
    """SCRFD-10G-KPS layout (torch module; eval mode). Input (N, 3, H, W) normalised as
    insightface's SCRFD feeds it; outputs, as insightface's exported detectors do, scores
    (N, A, 1) for strides 8/16/32, then boxes (N, A, 4), then keypoints (N, A, 10)."""
    torch, nn = _torch()
    cfg = SCRFD_LAYOUTS[size]

    def conv_bn(cin, cout, k=3, stride=1, relu=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1, relu=False))
            self.short = None
            if stride != 1 or cin != cout:  # ResNetV1e "avg_down" shortcut
                pool = [nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)] if stride > 1 else []
                self.short = nn.Sequential(*pool, conv_bn(cin, cout, 1, 1, relu=False))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.short is None else self.short(x)))

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            s = cfg["stem"]
            self.stem = nn.Sequential(conv_bn(3, s // 2, 3, 2), conv_bn(s // 2, s // 2), conv_bn(s // 2, s),
                                      nn.MaxPool2d(3, 2, 1))
            stages, cin = [], s
            for i, (n, planes) in enumerate(zip(cfg["blocks"], cfg["planes"])):
                blocks = [Basic(cin if b == 0 else planes, planes, (1 if i == 0 else 2) if b == 0 else 1)
                          for b in range(n)]
                stages.append(nn.Sequential(*blocks))
                cin = planes
            self.stages = nn.ModuleList(stages)
            used, c = cfg["planes"][1:], cfg["neck"]  # PAFPN start_level=1: strides 8, 16, 32
            self.lateral = nn.ModuleList(nn.Conv2d(p, c, 1) for p in used)
            self.fpn = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for _ in used)
            self.down = nn.ModuleList(nn.Conv2d(c, c, 3, 2, 1) for _ in used[1:])
            self.pafpn = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for _ in used[1:])
            h = cfg["head"]

            def tower():
                return nn.Sequential(*[conv_bn(c if i == 0 else h, h) for i in range(cfg["head_convs"])])

            self.towers = nn.ModuleList(tower() for _ in STRIDES)  # strides_share=False
            self.cls = nn.ModuleList(nn.Conv2d(h, ANCHORS, 3, 1, 1) for _ in STRIDES)
            self.reg = nn.ModuleList(nn.Conv2d(h, ANCHORS * 4, 3, 1, 1) for _ in STRIDES)
            self.kps = nn.ModuleList(nn.Conv2d(h, ANCHORS * 10, 3, 1, 1) for _ in STRIDES)
            self.scales = nn.Parameter(torch.ones(len(STRIDES)))

        def features(self, x):
            x = self.stem(x)
            outs = []
            for stage in self.stages:
                x = stage(x)
                outs.append(x)
            lat = [conv(f) for conv, f in zip(self.lateral, outs[1:])]
            for i in range(len(lat) - 1, 0, -1):  # top-down
                lat[i - 1] = lat[i - 1] + torch.nn.functional.interpolate(lat[i], size=lat[i - 1].shape[2:])
            inter = [conv(f) for conv, f in zip(self.fpn, lat)]
            for i in range(len(inter) - 1):  # bottom-up
                inter[i + 1] = inter[i + 1] + self.down[i](inter[i])
            return [inter[0]] + [conv(f) for conv, f in zip(self.pafpn, inter[1:])]

        def logits(self, x):
            return [cls(tower(f)) for f, tower, cls in zip(self.features(x), self.towers, self.cls)]

        def forward(self, x):
            scores, boxes, points = [], [], []
            n = x.shape[0]
            for i, f in enumerate(self.features(x)):
                t = self.towers[i](f)

                def flat(y, k):  # (N, A*k, h, w) -> (N, h*w*A, k), anchors fastest as SCRFD lays them
                    return y.permute(0, 2, 3, 1).reshape(n, -1, k)

                scores.append(torch.sigmoid(flat(self.cls[i](t), 1)))
                boxes.append(flat(self.reg[i](t) * self.scales[i], 4))
                points.append(flat(self.kps[i](t), 10))
            return (*scores, *boxes, *points)

    return Detector().eval()


def build_recognizer(size: str = "full"):
    """iresnet50 (arcface_torch) layout: (N, 3, 112, 112) -> (N, features)."""
    torch, nn = _torch()
    cfg = IRESNET_LAYOUTS[size]

    class Block(nn.Module):  # IBasicBlock: BN-conv-BN-PReLU-conv(stride)-BN, + shortcut
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return self.body(x) + (x if self.short is None else self.short(x))

    class Recognizer(nn.Module):
        def __init__(self):
            super().__init__()
            first = cfg["planes"][0]
            self.stem = nn.Sequential(nn.Conv2d(3, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first), nn.PReLU(first))
            blocks, cin = [], first
            for n, planes in zip(cfg["blocks"], cfg["planes"]):
                for b in range(n):
                    blocks.append(Block(cin, planes, 2 if b == 0 else 1))
                    cin = planes
            self.blocks = nn.Sequential(*blocks)
            self.bn = nn.BatchNorm2d(cin)
            self.fc = nn.Linear(cin * 7 * 7, cfg["features"])
            self.features = nn.BatchNorm1d(cfg["features"])

        def forward(self, x):
            x = self.bn(self.blocks(self.stem(x)))
            return self.features(self.fc(torch.flatten(x, 1)))

    return Recognizer().eval()


def count_macs(model, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the convolutions and linear layers for one input of `shape`."""
    torch, nn = _torch()
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_out
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in handles:
        h.remove()
    return total


def _randomise_batchnorm(model, generator) -> None:
    """Running statistics and affine terms that keep activations at unit scale, as a trained
    network's are; PyTorch's defaults (mean 0, var 1, weight 1) let a deep random ResNet's
    activations grow without bound."""
    torch, nn = _torch()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1, generator=generator)
            m.running_var.uniform_(0.5, 1.5, generator=generator)
            m.weight.data.uniform_(0.3, 0.6, generator=generator)
            m.bias.data.uniform_(-0.1, 0.1, generator=generator)


def _calibration_blob(size: int = 640) -> np.ndarray:
    """A photo (skimage's astronaut, in the package's data) laid out as SCRFD feeds it."""
    import cv2
    import skimage.data

    rgb = skimage.data.astronaut()
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[: rgb.shape[0], : rgb.shape[1]] = rgb
    return cv2.dnn.blobFromImage(canvas[:, :, ::-1], 1 / 128, (size, size), (127.5,) * 3, swapRB=True)


def write_random_pack(folder: str | Path, size: str = "full", *, seed: int = 0, detections: int = 2) -> Path:
    """det_10g.onnx + w600k_r50.onnx with random weights in `folder` (an insightface pack)."""
    torch, _ = _torch()
    if size not in SCRFD_LAYOUTS:
        raise ValueError(f"size must be one of {', '.join(SCRFD_LAYOUTS)}, got {size!r}")
    if detections < 1:
        raise ValueError(f"detections must be >= 1, got {detections}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    det, rec = build_detector(size), build_recognizer(size)
    for model in (det, rec):
        _randomise_batchnorm(model, generator)
    with torch.no_grad():
        # Shift every score bias by the logit that `detections` anchors exceed on the
        # calibration photo: sigmoid > 0.5 there, few anchors elsewhere.
        # Spread the logits first (std 2): a random net's are nearly equal, and scores tied
        # within float error make the two runtimes' orderings differ.
        blob = torch.from_numpy(_calibration_blob())
        spread = torch.cat([lg.flatten() for lg in det.logits(blob)]).std()
        for cls in det.cls:
            cls.weight *= 2.0 / spread
        logits = torch.cat([lg.flatten() for lg in det.logits(blob)])
        cut = torch.topk(logits, detections + 1).values[-2:].mean()
        for cls in det.cls:
            cls.bias -= cut
    # The TorchScript exporter at opset 11, as insightface's own packs were made; batch and
    # (for the detector) height and width are dynamic.
    det_outputs = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    torch.onnx.export(det, torch.zeros(1, 3, 640, 640), str(folder / DET_FILE), dynamo=False, opset_version=11,
                      input_names=["input.1"], output_names=det_outputs,
                      dynamic_axes={"input.1": {0: "n", 2: "h", 3: "w"}, **{o: {0: "n", 1: "a"} for o in det_outputs}})
    torch.onnx.export(rec, torch.zeros(1, 3, 112, 112), str(folder / REC_FILE), dynamo=False, opset_version=11,
                      input_names=["input.1"], output_names=["embedding"],
                      dynamic_axes={"input.1": {0: "n"}, "embedding": {0: "n"}})
    (folder / "GROUPSHOT_TEST_MODEL.txt").write_text(
        f"Random face models (seed {seed}, size {size}) written by `python -m personas.testing arcface-random`:\n"
        "the layouts of insightface's SCRFD-10G-KPS detector and iresnet50 recogniser, with random weights.\n"
        "For tests and speed measurements only: the faces they find and their embeddings mean nothing.\n"
        + json.dumps({"detector": SCRFD_LAYOUTS[size], "recognizer": IRESNET_LAYOUTS[size],
                      "detections_on_calibration": detections}) + "\n",
        encoding="utf-8",
    )
    return folder
