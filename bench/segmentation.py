"""A segmentation model over a folder: camx Grad-CAM against the plain forward-pass floor and
pytorch-grad-cam driven as its segmentation tutorial does, each a whole process, median of rounds.

* floor: a process that loads the model, decodes and resizes every image (PIL), normalises and
  runs the model's forward in batches, in inference mode, writing nothing;
* camx: ``python -m cam_cli explain DIR --method gradcam`` (overlay + .npy per image);
* pgc: a process doing what pytorch-grad-cam's tutorial does, image by image: forward to get the
  predicted mask, ``SemanticSegmentationTarget`` of the largest non-background class, ``GradCAM``
  on ``backbone.<last stage>``, ``show_cam_on_image``, and the same two files written.

Each round runs the three one after another; wall and CPU seconds of each whole process, the
ratios to the floor of the same round (medians over the rounds) and the load average beside
them (``bench/processes.py``). Random weights (``--weights NONE``), so nothing is downloaded;
the input size is the model's own (520 for torchvision's weights) unless ``--input-size``.
Not a test: no timing is asserted.

    python bench/segmentation.py --model lraspp_mobilenet_v3_large --images 64 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from processes import Rounds

FLOOR = """
import sys, torch, numpy as np
from pathlib import Path
from PIL import Image
from cam_cli.models import load_classifier
folder, model, size, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) or None, int(sys.argv[4])
c = load_classifier(model, "NONE", input_size=size)
size = c.input_size
mean = torch.tensor(c.mean).view(1, 3, 1, 1); std = torch.tensor(c.std).view(1, 3, 1, 1)
files = sorted(folder.glob("*.jpg"))
with torch.inference_mode():
    for i in range(0, len(files), batch):
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((size, size),
                         Image.BILINEAR))).permute(2, 0, 1) for f in files[i:i + batch]]).float() / 255
        c.module((x - mean) / std)["out"].argmax(1)
"""

PGC = """
import sys, torch, numpy as np, cv2
from pathlib import Path
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
from cam_cli.models import load_classifier
folder, model, size, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) or None, Path(sys.argv[5])
c = load_classifier(model, "NONE", input_size=size)
size = c.input_size
net = c.module.requires_grad_(True)
class Out(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x): return self.m(x)["out"]
wrapped = Out(net)
stages = [n for n, _ in net.backbone.named_children()]
layer = net.backbone.get_submodule(stages[-1])
mean = np.float32(c.mean); std = np.float32(c.std)
for f in sorted(folder.glob("*.jpg")):
    image = np.asarray(Image.open(f).convert("RGB"))
    rgb = np.float32(cv2.resize(image, (size, size))) / 255
    x = torch.from_numpy((rgb - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        labels = wrapped(x)[0].argmax(0).numpy()
    counts = np.bincount(labels.ravel(), minlength=21); counts[0] = 0
    k = int(counts.argmax())
    with GradCAM(model=wrapped, target_layers=[layer]) as cam:
        grayscale = cam(input_tensor=x, targets=[SemanticSegmentationTarget(k, np.float32(labels == k))])[0]
    full = cv2.resize(grayscale, (image.shape[1], image.shape[0]))
    overlay = show_cam_on_image(np.float32(image) / 255, full, use_rgb=True)
    cv2.imwrite(str(out / (f.name + ".gradcam.jpg")), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    np.save(out / (f.name + ".gradcam.npy"), full)
"""


def generate(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(folder / f"img{i:03d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=0, help="0: the model's own (520)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a camx checkout: camx from it too, in the same rounds")
    parser.add_argument("--no-peers", action="store_true", help="leave pytorch-grad-cam out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        generate(folder, args.images)
        size, batch, python = str(args.input_size), str(args.batch_size), sys.executable
        sized = ["--input-size", size] if args.input_size else []

        def peer(k: str) -> list[str]:
            (Path(tmp) / f"pgc{k}").mkdir()
            return [python, "-c", PGC, str(folder), args.model, size, batch, str(Path(tmp) / f"pgc{k}")]

        rounds = Rounds(args.images)
        pipelines = {
            "floor": lambda k: [python, "-c", FLOOR, str(folder), args.model, size, batch],
            "camx gradcam": lambda k: [python, "-m", "cam_cli", "explain", str(folder), "--model", args.model,
                                       "--weights", "NONE", *sized, "--batch-size", batch, "--method", "gradcam",
                                       "-q", "-o", str(Path(tmp) / f"out{k}")],
            "pgc gradcam": peer,
        }  # fmt: skip
        if args.no_peers:
            del pipelines["pgc gradcam"]
        rounds.run(args.rounds, pipelines, args.baseline)
    print(f"{args.model}, {args.images} images at {args.input_size or 'its own'} px, whole processes, "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(rounds.table())


if __name__ == "__main__":
    main()
