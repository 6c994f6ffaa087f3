"""Opening a run: find the inputs, load the model, probe it, resolve the layer,
the target and the methods, and check that every method applies, before
anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cam_cli import rundir
from cam_cli.device import use_channels_last
from cam_cli.errors import CamxError, ModelError
from cam_cli.images import InputImage, discover, select_shard
from cam_cli.jobs.base import ModelRunner, check_precision, open_device, place_model
from cam_cli.jobs.explain.reference import Reference, reference_for, with_reference
from cam_cli.methods import BatchExplainer, Method, MethodOptions, Setup, create, info, parse_methods
from cam_cli.methods.base import TargetLayer
from cam_cli.models import Classifier, Readout, load_classifier
from cam_cli.probe import resolve_targets, run_probe
from cam_cli.targets import TargetSpec, parse_target


def parse_method_list(method: Any) -> list[str]:
    try:
        return parse_methods(method)
    except ValueError as exc:
        raise CamxError(str(exc)) from None


def check_smoothing(names: list[str], aug_smooth: bool, eigen_smooth: bool) -> None:
    """``--aug-smooth`` / ``--eigen-smooth`` name the methods they do not apply to."""
    for flag, wanted, attribute in (("--aug-smooth", aug_smooth, "aug_smooth"), ("--eigen-smooth", eigen_smooth,
                                                                                   "eigen_smooth")):  # fmt: skip
        refused = [n for n in names if wanted and not getattr(info(n), attribute)]
        if refused:
            raise CamxError(f"{flag} does not apply to {', '.join(refused)}; run those without it (`camx methods`)")


@dataclass
class Session:
    """A prepared run: model loaded and probed, methods checked, nothing written yet."""

    classifier: Classifier
    #: the model on its device, its autocast forward and input normalisation
    runner: ModelRunner
    target_layer: TargetLayer | None
    target: TargetSpec
    methods: list[Method]
    explainer: BatchExplainer
    num_classes: int
    #: every target layer (several with ``--layer a,b``); ``target_layer`` is the first
    target_layers: list[TargetLayer] = field(default_factory=list)
    #: what an embedding model's images are compared with (``--target similar:REF``)
    reference: Reference | None = None

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def module(self) -> torch.nn.Module:
        return self.runner.module

    @property
    def channels_last(self) -> bool:
        """Whether the model and its batches are in channels-last memory format."""
        return self.runner.channels_last


def check_methods(
    method: Any, layer: str | None, aug_smooth: bool, eigen_smooth: bool, flag: str = "--layer"
) -> list[str]:
    """The methods asked for, checked against the options given with them."""
    names = parse_method_list(method)
    check_smoothing(names, aug_smooth, eigen_smooth)
    if layer is not None and not any(info(n).uses_layer for n in names):
        reads = {"fullgrad": "every biased layer"}
        why = "; ".join(f"{n} reads {reads.get(n, 'the gradient at the input')}, not one layer" for n in names)
        raise CamxError(f"{flag} does not apply to {', '.join(names)} ({why})")
    return names


def resolve_for(
    classifier: Classifier, probe: Any, names: list[str], layer: str | None, target: str
) -> tuple[int, list[TargetLayer], TargetSpec]:
    """From the probe: the number of classes, the target layers (when a method reads
    one; several for ``--layer a,b``) and the target, each checked against the model."""
    num_classes = int(probe.logits.shape[1])
    if classifier.categories is not None and len(classifier.categories) != num_classes:
        raise ModelError(f"{len(classifier.categories)} class names for a model with {num_classes} outputs")
    layers = resolve_targets(probe, layer) if any(info(n).uses_layer for n in names) else []
    return num_classes, layers, parse_target(target, classifier, num_classes)


def refuse_for_task(methods: list[Method], readout: Readout | None) -> None:
    """One line naming the first method that cannot explain this model's targets, and why."""
    for method in methods:
        reason = None if readout is None else readout.refusal(method.name)
        if reason is not None:
            raise ModelError(f"{method.name} cannot explain a {readout.task} model: {reason}")  # type: ignore[union-attr]


def build_explainer(
    names: list[str],
    options: MethodOptions,
    setup: Setup,
    aug_smooth: bool,
    batch_size: int,
    readout: Readout | None = None,
) -> BatchExplainer:
    """The methods created and prepared on the model as ``setup`` places it, in one explainer
    (``readout``: what the model's outputs are; None: a classifier's logits)."""
    methods = [create(name, options) for name in names]
    refuse_for_task(methods, readout)
    for method in methods:
        method.prepare(setup)
    explainer = BatchExplainer(setup.forward, setup.module, list(setup.targets), methods, aug_smooth=aug_smooth,
                               readout=readout)  # fmt: skip
    explainer.batch_size = batch_size  # the images per pass of methods with passes of their own
    return explainer


def open_session(config: Any) -> Session:
    """Load, probe and prepare everything ``config`` (an ``ExplainConfig``) asks for."""
    names = check_methods(config.method, config.layer, config.aug_smooth, config.eigen_smooth)
    device = open_device(config.device)
    check_precision(config.precision)
    classifier = load_classifier(
        config.model,
        config.weights,
        config.num_classes,
        config.labels,
        config.input_size,
        config.mean,
        config.std,
        config.output_key,
        seed=config.seed,  # --weights NONE: the same command builds the same model
        prompts=config.prompts,
        prompt_template=config.prompt_template,
    )
    reference = reference_for(config, classifier, device)
    if reference is None and config.num_classes == 0:
        raise CamxError("--num-classes 0 gives embeddings, not classes: explain them with --target similar:REF")
    if reference is None and classifier.embedding:
        raise CamxError(f"{config.model} gives embeddings, not classes: explain them with --target similar:REF")
    if reference is not None:  # an embedding model, explained by its similarity to the reference
        classifier, similarity = with_reference(classifier, reference)
    probe, channels_last = probe_model(classifier, use_channels_last(device))
    target_text, layer = (
        ("top1", model_layers(config.layer)) if reference is not None else (config.target, config.layer)
    )
    num_classes, layers, target = resolve_for(classifier, probe, names, layer, target_text)
    if reference is not None:
        target = similarity
    target_layer = layers[0] if layers else None
    runner = place_model(classifier.module, classifier.logits, classifier.mean, classifier.std, device,
                         config.precision, channels_last)  # fmt: skip
    options = MethodOptions(seed=config.seed, finer_gamma=config.finer_gamma, eigen_smooth=config.eigen_smooth,
                            kpca_kernel=config.kpca_kernel, kpca_gamma=config.kpca_gamma,
                            noise_samples=config.noise_samples, noise_std=config.noise_std,
                            concepts=config.concepts, sess_base=config.sess_base,
                            sess_scales=config.sess_scales)  # fmt: skip
    setup = Setup(probe, target_layer, runner.module, runner.forward, device, tuple(layers))
    explainer = build_explainer(names, options, setup, config.aug_smooth, config.batch_size, classifier.readout)
    explainer.raw_scores = reference is not None  # the manifest's score: the similarity itself
    if probe.input is not None and not vouched_for(probe, layers, explainer.methods):
        # once on the probe's input: a method that cannot run fails now, not mid-run
        dry_run(explainer, probe.input.to(device), target)
    return Session(classifier, runner, target_layer, target, explainer.methods, explainer, num_classes, layers,
                   reference)  # fmt: skip


def model_layers(layer: str | None) -> str | None:
    """``--layer`` of an embedding model in the similarity head that wraps it (``model.``)."""
    if layer is None:
        return None
    parts = [part.strip() for part in layer.split(",")]
    return ",".join(p if p.startswith("model.") or not p else f"model.{p}" for p in parts)


def probe_model(classifier: Classifier, channels_last: bool) -> tuple[Any, bool]:
    """The probe, run in the memory format the run will use (so that its pass
    prepares the kernels of the run's first), and whether that format is
    channels-last: a model that fails in it (a ``view`` of a permuted tensor)
    runs in the default format."""
    if channels_last:
        classifier.module.to(memory_format=torch.channels_last)
        try:
            return run_probe(classifier, channels_last=True), True
        except ModelError:
            classifier.module.to(memory_format=torch.contiguous_format)
    return run_probe(classifier), False


def vouched_for(probe: Any, targets: list[TargetLayer], methods: list[Method]) -> bool:
    """Whether the probe pass already showed that every method can run, so that the dry
    run can be skipped (it costs a forward and backward pass at start-up): methods
    without a backward pass read only the activations the probe saw, and the plain
    gradient methods need only that the probe's backward pass reached the layer (one
    layer: several hooked at once are checked by the dry run)."""
    gradient = [m for m in methods if m.needs_gradient]
    if any(not m.info.plain_gradient or not m.info.uses_layer for m in gradient):
        return False
    if not gradient:
        return True
    record = probe.find(targets[0].label) if len(targets) == 1 else None
    return record is not None and probe.reaches(record)


def dry_run(explainer: BatchExplainer, x: torch.Tensor, target: TargetSpec) -> None:
    """Every method once on one image; a failure names the method that failed. Methods with
    passes of their own (Score-CAM: K passes an image) are left out: those passes are the
    model's own forward, which the probe ran, and their ``prepare`` checks the rest."""
    names = {m.name for m in explainer.methods if not m.after_pass}
    if not names:
        return
    try:
        explainer.explain(x, target.chooser(explainer.readout.ranking), names=names)
        return
    except Exception:
        pass
    for method in explainer.methods:
        if method.name not in names:
            continue
        try:
            explainer.explain(x, target.chooser(explainer.readout.ranking), names={method.name})
        except ModelError as exc:
            named = str(exc).startswith(f"{method.name}: ")  # the method's own message names it
            raise ModelError(str(exc) if named else f"{method.name}: {exc}") from None
        except Exception as exc:
            message = " ".join(str(exc).split())[:240]
            raise ModelError(f"{method.name} cannot run on this model: {message}") from None
    explainer.explain(x, target.chooser(explainer.readout.ranking), names=names)  # together only: let it raise as it is


def select_images(config: Any, pruned: list[Path] | None = None) -> tuple[list[InputImage], list[InputImage]]:
    """All inputs found, and this shard's slice of them. Output folders of camx runs
    inside the input folders are skipped (and added to ``pruned``)."""
    found = discover(config.inputs, list(config.listed), config.out_dir, rundir.is_run_folder, pruned)
    k, n = config.shard
    return found, (select_shard(found, k, n) if n > 1 else found)
