"""Verify a collapse verdict by intervention: the probe images through the model with blocks intervened on, and how
much that changes the outputs (the paper's evidence: blocks after the last "unique" one reusing its map lose almost
no accuracy).

    report = measure("checkpoints/vit_micro_d32.safetensors", "builtin:digits", sweep("reuse", 32))
    report.rows()[16]       # reuse block 17's map in blocks 18-32: agreement, KL, feature cosine, accuracy (+ CIs)
    report = check_flagged(loaded, "builtin:digits", collapsed_blocks=list(range(18, 33)))   # flagged blocks

Per intervention and image: top-1 agreement with the unmodified model, KL(p_orig || p_intervened) of the softmax
outputs, cosine of the final features (the classifier's input, "pre-logits") and, where the images carry labels
(builtin:digits, or (x, y) batches), top-1 accuracy of both. The unmodified outputs are computed inside the same
switched paths (``hooks.intervene`` without an intervention), so a difference is the intervention's alone. A model
without a classifier (e.g. a DINOv2 backbone) gets only the feature cosine.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UnsupportedModelError
from ..hooks.intervene import check, intervene, intervention_blocks
from ..loading.images import batch_images, image_labels
from ..loading.info import LoadedModel
from .outcome import Intervention, InterventionReport, Outcome
from .run import default_images, image_batches, open_model, probe


class _Prefix:
    """The unmodified forward's block outputs for the current batch, so that an intervention whose first touched
    block is e re-runs only blocks e..L: blocks before e see the same input on the same switched path (``intervene``
    without an intervention), so their outputs are the recorded ones. Used only where every block is one whole module
    called once per forward, in order (timm, ours, transformers, torchvision); otherwise every forward runs in full.
    Outputs are cloned on record and on replay, so a block that writes into its input cannot change the record."""

    def __init__(self, blocks: Sequence[Any]) -> None:
        mods = [b.skip_modules[0] if len(b.skip_modules) == 1 and not b.zero_branches else None for b in blocks]
        ids = {id(m) for m in mods}
        nested = any(id(sub) in ids for m in mods if m is not None for sub in list(m.modules())[1:])
        self.modules = [] if None in mods or len(ids) != len(mods) or nested else mods
        self.outputs: list[Any] = []
        self.calls: dict[int, int] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.outputs, self.calls = [None] * len(self.modules), {}

        def keep(j: int) -> Callable:
            def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
                self.calls[j] = self.calls.get(j, 0) + 1
                self.outputs[j] = _clone(out)
            return hook
        handles = [m.register_forward_hook(keep(j)) for j, m in enumerate(self.modules)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if any(self.calls.get(j) != 1 for j in range(len(self.modules))):
            self.modules = []  # a block called twice or never: not a plain stack, so no shortcut from now on

    @contextlib.contextmanager
    def replaying(self, first: int) -> Iterator[None]:
        """Blocks 0..first-1 (0-based) return their recorded outputs without computing."""
        upto = first if self.modules else 0
        for j in range(upto):
            self.modules[j].forward = (lambda *_a, _o=self.outputs[j], **_k: _clone(_o))
        try:
            yield
        finally:
            for j in range(upto):
                self.modules[j].__dict__.pop("forward", None)


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_clone(o) for o in out)
    if isinstance(out, list):
        return [_clone(o) for o in out]
    return out


def _first_touched(iv: Intervention) -> int:
    """The earliest 0-based block an intervention changes or reads a map from."""
    spec = iv.spec()
    touched = [*spec.get("skip", []), *spec.get("uniform", [])]
    for target, source in spec.get("reuse", {}).items():
        touched += [target, source]
    return min(touched) if touched else 0


HEAD_NAMES = ("heads", "classifier", "cls_classifier", "mlp_head", "head", "fc")  # torchvision, HF, vit-pytorch, ...
Output = tuple["torch.Tensor | None", torch.Tensor]  # (logits [B, K] or None, final features [B, D])


def classifier(model: nn.Module) -> nn.Module | None:
    """The module that turns final features into logits (its input = the pre-logits), or None for a backbone."""
    get = getattr(model, "get_classifier", None)
    head = None
    if callable(get) and type(model).__module__.startswith(("timm.", "collapse_probe.")):
        head = get()
        head = head[0] if isinstance(head, tuple) else head
    else:
        head = next((m for n in HEAD_NAMES if isinstance(m := getattr(model, n, None), nn.Module)), None)
    return None if head is None or isinstance(head, nn.Identity) else head


def _tensor(y: Any) -> torch.Tensor:
    """A model's output as one tensor: itself, HF ``logits``, else ``pooler_output`` / the first token."""
    if isinstance(y, torch.Tensor):
        return y
    for name in ("logits", "pooler_output"):
        if getattr(y, name, None) is not None:
            return getattr(y, name)
    return y.last_hidden_state[:, 0]


def _check_all(model: nn.Module, interventions: Sequence[Intervention],
               keep_going: bool) -> tuple[list[Intervention], list[str]]:
    """(the interventions the model allows, one line per refused one); raises unless ``keep_going``."""
    blocks = intervention_blocks(model)
    ok, refused = [], []
    for iv in interventions:
        spec = iv.spec()
        try:
            check(blocks, spec.get("reuse", {}), spec.get("uniform", ()), spec.get("skip", ()), {})
        except UnsupportedModelError as e:
            if not keep_going:
                raise
            refused.append(f"{iv.describe()}: {e}")
            continue
        ok.append(iv)
    return ok, refused


def _add(o: Outcome, ref: Output, new: Output, labels: torch.Tensor | None) -> None:
    """Accumulate one batch: ref / new = (logits [B, K] or None, features [B, ...]) without / with the intervention."""
    (lr, fr), (ln, fn) = ref, new
    n = fr.shape[0]
    o.images += n
    o.cos_sum += float(F.cosine_similarity(fr.flatten(1).double(), fn.flatten(1).double(), dim=1).sum())
    if lr is None or ln is None:
        o.agree = o.kl_sum = None
        return
    pr, pn = lr.double().log_softmax(-1), ln.double().log_softmax(-1)
    p = pr.exp()
    o.kl_sum += float(torch.where(p > 0, p * (pr - pn), torch.zeros_like(p)).sum())
    top_r, top_n = lr.argmax(-1), ln.argmax(-1)
    o.agree += int((top_r == top_n).sum())
    if labels is not None:
        y = labels.to(top_r.device)
        o.labelled += n
        o.correct_orig += int((top_r == y).sum())
        o.correct += int((top_n == y).sum())


def _labels_of(batch: Any, labels: list[int] | None, seen: int, n: int) -> torch.Tensor | None:
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return torch.tensor(labels[seen:seen + n]) if labels is not None else None


@torch.inference_mode()
def measure(
    model_or_path: nn.Module | LoadedModel | str | Path,
    images: str | Path | torch.Tensor | Iterable | None = None,
    interventions: Sequence[Intervention] = (),
    *,
    labels: Sequence[int] | torch.Tensor | None = None,
    num_images: int | None = None,
    batch_size: int = 16,
    workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    similarity: bool = False,
    probe_options: dict[str, Any] | None = None,
    keep_going: bool = False,
    prefix_cache: bool = True,
    **load: Any,
) -> InterventionReport:
    """Measure each intervention's effect on the outputs over ``images``.

    Args:
        model_or_path: a checkpoint (read with every loading check; ``load``: model_name, num_heads, mean, std,
            key, trust_pickle), a ``LoadedModel`` or a model in memory.
        images: as for ``probe``: a folder, builtin:photos / builtin:digits, a tensor [B, 3, H, W] or batches
            (tensors or (x, y)); ``labels`` [B] go with a tensor. builtin:digits brings its labels.
        interventions: ``outcome.Intervention`` objects (``from_block``, ``one_block``, ``sweep``).
        similarity: also probe the model once (``probe``, with ``probe_options``) for the applied maps' similarity
            of each block with the previous one; needs images that can be read twice (not a one-shot iterator).
        keep_going: record interventions the family refuses in ``report.refused`` instead of raising (exit 5).
        prefix_cache: run an intervention's forward from its first touched block on, the blocks before it taken from
            the unmodified forward of the same batch (``_Prefix``; the same numbers, about half the time).

    Raises BadArgumentError for impossible interventions (exit 2), UnsupportedModelError for refused ones (exit 5).
    The model is put in eval mode while measuring and restored, like every hook and switch (``hooks.intervene``).
    """
    loaded, dev, _ = open_model(model_or_path, device, **load)
    model = loaded.model
    if images is None:  # the probe's and the commands' default: the set the checkpoint was trained on, else photos
        images = default_images(model_or_path)
    blocks = intervention_blocks(model)
    todo, refused = _check_all(model, interventions, keep_going)
    batches, image_info = image_batches(images, model, num_images, batch_size, workers)
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    if labels is None and (images is None or isinstance(images, (str, Path))):
        labels = image_labels(images, num_images)
    outcomes = [Outcome(iv) for iv in todo]
    head = classifier(model)
    feats: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, i, _o: feats.append(i[0])) if head is not None else None

    def forward(x: torch.Tensor) -> Output:
        feats.clear()
        y = _tensor(model(x))
        return (y, feats[-1]) if head is not None else (None, y)

    prefix = _Prefix(blocks if prefix_cache else [])
    was_training = model.training
    model.eval()
    total = len(batches) * (1 + len(todo)) if hasattr(batches, "__len__") else None
    bar = tqdm(total=total, desc="intervening", unit="forward", disable=not progress, leave=False)
    seen = 0
    try:
        for batch in batches:
            x = batch_images(batch).to(dev)
            y = _labels_of(batch, labels, seen, x.shape[0])
            seen += x.shape[0]
            with intervene(model), prefix.recording():
                ref = forward(x)
            bar.update()
            for o in outcomes:
                with intervene(model, **o.intervention.spec()), prefix.replaying(_first_touched(o.intervention)):
                    _add(o, ref, forward(x), y)
                bar.update()
    finally:
        bar.close()
        model.train(was_training)
        if handle is not None:
            handle.remove()
    sim = None
    if similarity:
        opts = {"kinds": ("probs", "mixed"), **(probe_options or {}), "baseline": False}  # the curve needs no twin
        res = probe(loaded, images, num_images=num_images, batch_size=batch_size, workers=workers, device=dev,
                    progress=progress, **opts)
        st, s = res.attention[res.applied_kind], res.settings
        sim = {"kind": res.applied_kind, "blocks": [b + 1 for b in st.blocks], "threshold": s["threshold"],
               "neighbors": s["neighbors"], "reduction": s["reduction"],
               "neighbor": st.neighbor(s["neighbors"], s["reduction"]).tolist()}
    settings = {"batch_size": batch_size, "device": str(dev), "classifier": head is not None,
                "labels": labels is not None or any(o.labelled for o in outcomes)}
    return InterventionReport(outcomes, loaded.info, image_info, len(blocks),
                              [b.swap.kind if b.swap is not None else None for b in blocks], sim, settings, refused)


def _last_run(blocks: Sequence[int]) -> tuple[int, int] | None:
    """(first, last) of the last run of consecutive numbers, or None."""
    bs = sorted(set(blocks))
    if not bs:
        return None
    first = bs[-1]
    while first - 1 in bs:
        first -= 1
    return first, bs[-1]


def check_flagged(
    model_or_loaded: nn.Module | LoadedModel | str | Path,
    images: str | Path | torch.Tensor | Iterable | None,
    collapsed_blocks: list[int],
    **options: Any,
) -> InterventionReport | None:
    """The cheap checks of a verdict: for the last run of collapsed blocks f..l (1-based, as the verdict names them;
    each similar to the block before it), reuse block f-1's map in blocks f..l, and skip blocks f..l. None when no
    block is flagged.

    ``options`` go to ``measure`` (num_images, batch_size, device, progress, labels, load options ...). Interventions
    the model's family cannot make are listed in ``report.refused`` rather than raised.
    """
    run = _last_run(collapsed_blocks)
    if run is None:
        return None
    first, last = run
    targets = tuple(range(first, last + 1))
    ivs = [Intervention("reuse", targets, first - 1, first - 1)] if first >= 2 else []
    ivs.append(Intervention("skip", targets, None, max(first - 1, 1)))
    return measure(model_or_loaded, images, ivs, keep_going=True, **{"progress": False, **options})
