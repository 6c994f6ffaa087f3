"""The detection readout: which detection of a masked or ablated input stands for an original
one (same label, highest IoU, at least 0.5; none: score 0), checked against a reference
written here from the rule, and pinned passes reading row ``i`` as a copy of image ``rows[i]``."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from cam_cli.errors import ModelError
from cam_cli.models.detection_readout import DetectionReadout, matched_scores


def reference_match(output: dict[str, torch.Tensor], box: list[float], label: int) -> float:
    """The rule, one detection at a time: among the detections of ``label``, the highest IoU
    with ``box``; its score when that IoU is at least 0.5, else 0."""
    best, score = -1.0, 0.0
    for found, found_label, found_score in zip(output["boxes"], output["labels"], output["scores"], strict=True):
        if int(found_label) != label:
            continue
        iou = float(box_iou(torch.tensor([box]), found[None])[0, 0])
        if iou > best:
            best, score = iou, float(found_score)
    return score if best >= 0.5 else 0.0


def random_output(generator: torch.Generator, count: int) -> dict[str, torch.Tensor]:
    corner = torch.rand(count, 2, generator=generator) * 80
    size = 10 + torch.rand(count, 2, generator=generator) * 30
    scores = torch.rand(count, generator=generator).sort(descending=True).values  # as models report them
    labels = torch.randint(1, 4, (count,), generator=generator)
    return {"boxes": torch.cat([corner, corner + size], 1), "labels": labels, "scores": scores}


@pytest.mark.parametrize("seed", range(5))
def test_matched_scores_follow_the_rule(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    output = random_output(generator, 12)
    # the originals: jittered copies of some detections (labels kept or changed), and far-away boxes
    jitter = torch.randn(12, 4, generator=generator) * 4
    originals = torch.cat([output["boxes"] + jitter, torch.tensor([[200.0, 200, 230, 240]])])
    labels = torch.cat([torch.where(torch.rand(12, generator=generator) < 0.3, 3, output["labels"]), torch.tensor([1])])
    ours = matched_scores(output, originals, labels)
    expected = [reference_match(output, b.tolist(), int(v)) for b, v in zip(originals, labels, strict=True)]
    assert ours.tolist() == pytest.approx(expected, abs=1e-7)
    assert 0 < sum(e == 0 for e in expected) < len(expected), "the cases should hold matches and misses"


def test_a_better_box_of_another_label_does_not_hide_the_match() -> None:
    """pytorch-grad-cam's FasterRCNNBoxScoreTarget takes the best IoU over every label and then
    asks for the label (so a better box of another class gives 0), and adds the IoU to the score;
    the rule asks for the label first and gives the score alone."""
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    output = {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12]]), "labels": torch.tensor([2, 1]),
              "scores": torch.tensor([0.9, 0.6])}  # fmt: skip
    box, label = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([1])
    assert matched_scores(output, box, label).tolist() == pytest.approx([0.6])
    assert float(FasterRCNNBoxScoreTarget([1], box.numpy())(output)) == 0.0
    same = {k: v[1:] for k, v in output.items()}
    assert float(FasterRCNNBoxScoreTarget([1], box.numpy())(same)) == pytest.approx(0.6 + 10 / 12)
    assert matched_scores(same, box, label).tolist() == pytest.approx([0.6])


def test_no_detection_and_no_target_give_zeros_and_the_score_keeps_its_gradient() -> None:
    scores = torch.tensor([0.8, 0.4], requires_grad=True)
    output = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 1]),
              "scores": scores}  # fmt: skip
    found = matched_scores(output, torch.tensor([[21.0, 20, 30, 30], [0, 0, 4, 4]]), torch.tensor([1, 1]))
    assert found.tolist() == pytest.approx([0.4, 0.0])
    found.sum().backward()
    assert scores.grad is not None and scores.grad.tolist() == [0.0, 1.0]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    assert matched_scores(empty, torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1])).tolist() == [0.0]
    assert matched_scores(output, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_the_free_pass_chooses_and_pinned_passes_match() -> None:
    generator = torch.Generator().manual_seed(7)
    first, second = random_output(generator, 6), random_output(generator, 3)
    readout = DetectionReadout(lambda scores, labels: (scores >= 0.3).nonzero().flatten()[:2])
    targets = readout([first, second])
    counts = [min(2, int((o["scores"] >= 0.3).sum())) for o in (first, second)]
    assert targets.shape == (2, max(counts))
    for n, output in enumerate((first, second)):
        assert targets[n, : counts[n]].tolist() == output["scores"][: counts[n]].tolist()
        assert targets[n, counts[n] :].abs().sum() == 0
        assert readout.boxes[n].tolist() == output["boxes"][: counts[n]].tolist()
    # three perturbed copies: of image 1, image 0 with its boxes shifted 30 px, image 0 as it was
    shifted = {**first, "boxes": first["boxes"] + 30}
    with readout.pinned(torch.tensor([1, 0, 0])):
        pinned = readout([second, shifted, first])
    assert pinned.shape == (3, max(counts))
    for row, (image, output) in enumerate(((1, second), (0, shifted), (0, first))):
        expected = [reference_match(output, b.tolist(), int(v))
                    for b, v in zip(readout.boxes[image], readout.labels[image], strict=True)]  # fmt: skip
        assert pinned[row, : len(expected)].tolist() == pytest.approx(expected)
    assert pinned[2, : counts[0]].tolist() == pytest.approx(first["scores"][: counts[0]].tolist())
    with pytest.raises(ModelError, match="does not match"), readout.pinned(torch.tensor([0])):
        readout([first, second])
    with pytest.raises(ModelError, match="did not see"), readout.pinned(torch.tensor([5])):
        pass


def test_targets_pinned_from_a_manifest() -> None:
    readout = DetectionReadout()
    rows = readout.pin_targets([torch.tensor([0.0, 0, 10, 10]), torch.tensor([20.0, 20, 30, 30])],
                               [torch.tensor([1]), torch.tensor([2])])  # fmt: skip
    assert rows.tolist() == [0, 1]
    output = {"boxes": torch.tensor([[20.0, 20, 30, 31], [0, 0, 10, 10]]), "labels": torch.tensor([2, 1]),
              "scores": torch.tensor([0.7, 0.5])}  # fmt: skip
    with readout.pinned(torch.tensor([1, 0, 1])):
        assert readout([output, output, output])[:, 0].tolist() == pytest.approx([0.7, 0.5, 0.7])
    assert readout.pin_targets([torch.tensor([1.0, 1, 2, 2])], [torch.tensor([3])]).tolist() == [2]
